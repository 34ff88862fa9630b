"""Paths a user names on the command line: overlap between source and target, a claim on the
target, leftovers of killed runs, output files, and operating-system errors as one-line messages."""

import contextlib
import errno
import fcntl
import os
import shutil
import sys
from pathlib import Path

from pdmix.errors import PdmixError


def os_reason(e: BaseException) -> str:
    """'Permission denied', 'No space left on device', ... for an OSError or a library error wrapping one."""
    if isinstance(e, OSError):
        return e.strerror or e.__class__.__name__
    text = str(e)
    for code in (errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EDQUOT, errno.EIO):
        if f"code: {code}," in text or os.strerror(code) in text:
            return os.strerror(code)
    return f"{e.__class__.__name__}: {text.splitlines()[0][:200] if text else ''}"


@contextlib.contextmanager
def os_errors(flag: str, path):
    """Turn an OSError inside the block into `FLAG PATH: cannot write (reason)`."""
    try:
        yield
    except OSError as e:
        raise PdmixError(f"{flag} {path}: cannot write ({os_reason(e)})") from None


def non_directory(path: Path) -> Path | None:
    """The first of `path` and the folders above it that exists but is not a directory, if any."""
    return next((p for p in (path, *path.parents) if p.exists() and not p.is_dir()), None)


def _resolved(p) -> Path:
    return Path(os.path.realpath(os.path.abspath(p)))


def check_no_overlap(source, target, source_flag: str = "--model_path", target_flag: str = "--save_path") -> None:
    """The target may be neither the source, nor inside it, nor hold it (symlinks followed): writing
    it, or replacing it with --overwrite, must never touch the source."""
    s, t = _resolved(source), _resolved(target)
    if s == t:
        how = "is the same folder as"
    elif s in t.parents:
        how = "is inside"
    elif t in s.parents:
        how = "contains"
    else:
        return
    raise PdmixError(f"{target_flag} {target} {how} {source_flag} {source}; choose a folder outside the source")


def leftovers(target: Path) -> list[Path]:
    """Temporary folders beside `target` from runs that were killed before they could clean up."""
    parent = target.parent
    if not parent.is_dir():
        return []
    return sorted(p for pat in (f".{target.name}.tmp-*", f".{target.name}.old-*") for p in parent.glob(pat))


def remove_path(p: Path) -> None:
    if p.is_symlink() or not p.is_dir():
        p.unlink(missing_ok=True)
    else:
        shutil.rmtree(p, ignore_errors=True)


@contextlib.contextmanager
def claim(target: Path, flag: str):
    """Hold an exclusive lock on `target` for the whole run, so that two runs writing the same folder
    cannot both succeed; the second is refused at once. The lock dies with its process, so a killed
    run never blocks the next one, which then removes what the killed run left behind."""
    lock_path = target.parent / f".{target.name}.lock"
    with os_errors(flag, target):
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            raise PdmixError(f"{flag} {target} is being written by another pdmix run (pid {holder}); "
                             f"wait for it or choose another folder") from None
        if os.fstat(fd).st_ino != os.stat(lock_path).st_ino:  # the previous holder removed it meanwhile
            raise PdmixError(f"{flag} {target} is being written by another pdmix run; try again")
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        for old in leftovers(target):
            print(f"pdmix: removing {old}, left by an interrupted run", file=sys.stderr)
            remove_path(old)
        yield
    finally:
        with contextlib.suppress(OSError):
            if os.fstat(fd).st_ino == os.stat(lock_path).st_ino:
                os.unlink(lock_path)
        os.close(fd)


def _probe_write(folder: Path, name: str, flag: str, shown: Path) -> None:
    """Create and remove an empty file in folder: `FLAG SHOWN: cannot write (reason)` if that fails."""
    probe = folder / name
    with os_errors(flag, shown):
        probe.write_bytes(b"")
        probe.unlink()


def check_writable_dir(path, flag: str) -> Path:
    """Before a run: `path` is an existing folder that files can be created in (nothing is left behind)."""
    p = Path(path)
    if not p.exists():
        raise PdmixError(f"{flag} {p}: no such folder")
    if not p.is_dir():
        raise PdmixError(f"{flag} {p}: not a folder")
    _probe_write(p, f".pdmix-probe-{os.getpid()}", flag, p)
    return p


def check_output_file(path, flag: str = "--output") -> Path:
    """Before a long run: the file can be created (its folder exists and is writable), so the results
    are not lost at the end. Nothing is left behind by the check."""
    p = Path(path)
    if p.is_dir():
        raise PdmixError(f"{flag} {p}: is a directory")
    parent = p.absolute().parent
    if not parent.exists():
        raise PdmixError(f"{flag} {p}: folder {parent} does not exist")
    if not parent.is_dir():
        raise PdmixError(f"{flag} {p}: {parent} is not a directory")
    _probe_write(parent, f".{p.name}.probe-{os.getpid()}", flag, p)
    return p


def write_output_file(path, text: str, flag: str = "--output") -> None:
    """Write under a temporary name, then rename: a full disk never leaves half a file."""
    p = Path(path)
    tmp = p.absolute().parent / f".{p.name}.tmp-{os.getpid()}"
    try:
        with os_errors(flag, p):
            tmp.write_text(text)
            tmp.replace(p)
    finally:
        tmp.unlink(missing_ok=True)


def write_results(path, text: str) -> None:
    """A run's results to --output; if that fails (a disk that filled during a long run), they go to
    stdout before the error, so they are not lost."""
    try:
        write_output_file(path, text)
    except PdmixError:
        print(text)
        raise


def pdmix_home() -> Path:
    """Where pdmix caches models, downloads and built kernels: $PDMIX_HOME or ~/.cache/pdmix."""
    home = Path(os.environ.get("PDMIX_HOME") or Path.home() / ".cache" / "pdmix")
    if (p := non_directory(home)) is not None:
        raise PdmixError(f"PDMIX_HOME {home}: {p} is not a directory")
    return home
