"""Write an output folder under a temporary name and rename it into place only when it is complete."""

import contextlib
import os
import shutil
from pathlib import Path

from safetensors import SafetensorError

from pdmix.errors import PdmixError
from pdmix.paths import claim, non_directory, os_errors, os_reason, remove_path


def check_target(target: Path, overwrite: bool, flag: str = "--save_path") -> None:
    try:
        if target.exists() and not target.is_dir():
            raise PdmixError(f"{flag} {target} exists and is not a directory")
        if target.is_dir() and any(target.iterdir()) and not overwrite:
            raise PdmixError(f"{flag} {target} exists and is not empty; pass --overwrite to replace it")
    except OSError as e:
        raise PdmixError(f"{flag} {target}: cannot read ({os_reason(e)})") from None


def _make_parent(target: Path, flag: str) -> None:
    if (p := non_directory(target.parent)) is not None:
        raise PdmixError(f"{flag} {target}: {p} is not a directory")
    with os_errors(flag, target):
        target.parent.mkdir(parents=True, exist_ok=True)


@contextlib.contextmanager
def atomic_dir(target: str | os.PathLike, overwrite: bool = False, flag: str = "--save_path"):
    """Yield a fresh temporary folder beside `target`; on success it replaces `target`.

    `target` is claimed for the run (a second run into it is refused).
    On any exception (KeyboardInterrupt included) the temporary folder is removed and `target` is
    left as it was, so an interrupted run never leaves a half-written directory; an OS error while
    writing (disk full, read-only) becomes a one-line PdmixError naming `flag`.
    """
    target = Path(target).absolute()
    check_target(target, overwrite, flag)
    _make_parent(target, flag)
    with claim(target, flag):
        tmp = target.parent / f".{target.name}.tmp-{os.getpid()}"
        try:
            tmp.mkdir()
            yield tmp
            check_target(target, overwrite, flag)  # again: something may have appeared there meanwhile
            if target.exists() or target.is_symlink():
                old = target.parent / f".{target.name}.old-{os.getpid()}"
                target.rename(old)
                tmp.rename(target)
                remove_path(old)
            else:
                tmp.rename(target)
        except (OSError, SafetensorError) as e:
            shutil.rmtree(tmp, ignore_errors=True)
            raise PdmixError(f"{flag} {target}: cannot write ({os_reason(e)})") from None
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
