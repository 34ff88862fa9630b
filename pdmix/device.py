"""--device: cpu, cuda (cuda:N) or auto, checked once for the quantizer, the runtime and the bench."""

import torch

from pdmix.errors import PdmixError


def resolve_device(device: str | torch.device) -> torch.device:
    name = str(device)
    if name.startswith("npu"):
        raise PdmixError(f"--device {name}: Ascend NPUs are not supported by pdmix; use --device cpu or cuda")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise PdmixError(f"--device {name}: expected cpu, cuda or auto") from None
    if dev.type not in ("cpu", "cuda"):
        raise PdmixError(f"--device {name}: expected cpu, cuda or auto")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise PdmixError(f"--device {name}: no CUDA device is available")
    return dev
