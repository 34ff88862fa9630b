"""int8 operations of a W8A8_MIX linear (SPEC §5) behind one interface.

`reference` is plain torch and the oracle for tests; faster backends (GPU) implement the same
functions and are picked by `get_backend`.
"""

from pdmix.kernels import reference


import functools

import torch


def get_backend(device) -> object:
    """The kernel module for a device: the reference on CPU (torch._int_mm is already the fast path)."""
    return _backend(torch.device(device).type)


@functools.cache
def _backend(device_type: str) -> object:
    if device_type == "cuda":
        try:
            from pdmix.kernels import cuda  # optional fast path
            return cuda
        except ImportError:
            pass
    return reference
