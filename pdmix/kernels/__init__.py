"""int8 operations of a W8A8_MIX linear (SPEC §5) behind one interface.

`reference` is plain torch and the oracle for tests; faster backends (GPU) implement the same
functions and are picked by `get_backend`.
"""

from pdmix.kernels import reference


def get_backend(device) -> object:
    """The kernel module for a device: the reference on CPU (torch._int_mm is already the fast path)."""
    import torch
    if torch.device(device).type == "cuda":
        try:
            from pdmix.kernels import cuda  # noqa: F401  (optional fast path)
            return cuda
        except ImportError:
            pass
    return reference
