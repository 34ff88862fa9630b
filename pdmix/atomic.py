"""Write an output folder under a temporary name and rename it into place only when it is complete."""

import contextlib
import os
import shutil
from pathlib import Path

from pdmix.errors import PdmixError


def check_target(target: Path, overwrite: bool, flag: str = "--save_path") -> None:
    if target.exists() and not target.is_dir():
        raise PdmixError(f"{flag} {target} exists and is not a directory")
    if target.is_dir() and any(target.iterdir()) and not overwrite:
        raise PdmixError(f"{flag} {target} exists and is not empty; pass --overwrite to replace it")


@contextlib.contextmanager
def atomic_dir(target: str | os.PathLike, overwrite: bool = False, flag: str = "--save_path"):
    """Yield a fresh temporary folder beside `target`; on success it replaces `target`.

    On any exception (KeyboardInterrupt included) the temporary folder is removed and `target` is
    left as it was, so an interrupted run never leaves a half-written directory.
    """
    target = Path(target).absolute()
    check_target(target, overwrite, flag)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        if target.exists():
            old = target.parent / f".{target.name}.old-{os.getpid()}"
            target.rename(old)
            tmp.rename(target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
