"""Putting a finished build at OUT: one build per OUT at a time, an atomic switch, no leftovers of dead builds.

- `build_lock(out)` holds `.OUT.lock` (beside OUT) for the whole build; a second build of the same OUT fails at
  once with a one-line `BuildError` naming the holder's pid, rather than waiting (builds take minutes to hours).
- `remove_stale(out)` deletes the `.OUT.tmp-*` directories of builds that died; only called under the lock, when
  no live build of OUT can own one.
- `publish(tmp, out)` moves the finished build to OUT. Over an existing OUT it exchanges the two directories in one
  `renameat2(RENAME_EXCHANGE)` call (Linux 3.15+, most local filesystems), so a crash at any moment leaves the old
  or the new artifact at OUT. Where the exchange is not available it falls back to two renames, with a moment in
  between when OUT does not exist. Readers (`Pipeline.load`) detect a switch during loading and load again.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

from btp.runtime.errors import BuildError

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def lock_path(out: Path) -> Path:
    return out.parent / f".{out.name}.lock"


def temp_prefix(out: Path) -> str:
    return f".{out.name}.tmp-"


@contextlib.contextmanager
def build_lock(out: Path) -> Iterator[None]:
    """Hold the build lock of `out` (an exclusive `flock` on `.OUT.lock` beside it, removed on release).

    Raises `BuildError` at once when another process holds it. The lock file is unlinked while still locked, and a
    process that locked a file since unlinked tries again, so two builds never both believe they hold it."""
    import fcntl

    path = lock_path(out)
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            raise BuildError(f"cannot create the build lock {path}: {err.strerror or err}") from err
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise BuildError(f"{out}: another btp-compile (pid {holder}) is building it; wait for it to finish or "
                             f"choose another -o (lock {path})") from None
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # the holder before us removed this file on release: lock the new one
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)
        os.close(fd)


def remove_stale(out: Path) -> list[Path]:
    """Delete what dead builds of `out` left beside it (`.OUT.tmp-*`); call only under `build_lock(out)`."""
    removed = []
    if out.parent.is_dir():
        for p in out.parent.glob(f"{temp_prefix(out)}*"):
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p)
    return removed


def _exchange(a: Path, b: Path) -> bool:
    """Swap directories `a` and `b` atomically; False where the platform or filesystem cannot."""
    if not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    fn = getattr(libc, "renameat2", None)
    if fn is None:
        return False
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def publish(tmp: Path, out: Path) -> None:
    """Put the finished build `tmp` at `out`; an existing `out` is replaced atomically where possible and
    removed only after the switch."""
    if not (out.exists() or out.is_symlink()):
        os.replace(tmp, out)
        return
    if _exchange(tmp, out):
        shutil.rmtree(tmp, ignore_errors=True)  # now the old artifact; a crash here leaves it for remove_stale
        return
    old = Path(f"{tmp}-old")
    os.replace(out, old)
    try:
        os.replace(tmp, out)
    except OSError:
        os.replace(old, out)
        raise
    shutil.rmtree(old, ignore_errors=True)
