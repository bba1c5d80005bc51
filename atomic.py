"""Atomic writes: a result file or folder is either the old complete one or the new complete one, never half.

Everything the project writes for a user (evaluation JSON, tables, benchmark reports, checkpoints) goes through
here: the data is written to a temporary name in the same folder (same file system, so the rename is atomic),
flushed to disk, then renamed over the target. A job killed at any moment leaves no truncated file behind.
"""
import json
import os
import re
import shutil
import signal
import tempfile
import threading
from pathlib import Path


def atomic_write_bytes(path, data: bytes):
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; a result file gets the usual permissions
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path, text: str):
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path, obj, **dumps_kwargs):
    atomic_write_text(path, json.dumps(obj, **dumps_kwargs) + "\n")


def check_writable_file(path) -> Path:
    """Raise ValueError (one line naming the fix) unless `path` can be written as a file, before any work is done:
    its folder exists or can be made, it is not a folder itself, and the folder accepts new files."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path} is a folder: give a file name (e.g. {path / 'result.json'})")
    parent = path.parent
    for ancestor in (parent, *parent.parents):
        if ancestor.exists():
            if not ancestor.is_dir():
                raise ValueError(f"{path}: {ancestor} is a file, not a folder: choose another path")
            break
    try:
        parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=parent, prefix=f".{path.name}.", suffix=".check")
        os.close(fd)
        os.unlink(tmp)
    except OSError as e:
        raise ValueError(f"cannot write {path} ({e.strerror}): choose a writable folder")
    return path


class AtomicDir:
    """Build a folder beside `target` and swap it in on success: `with AtomicDir(target) as tmp: write into tmp`.
    On an exception (KeyboardInterrupt included) the temporary folder is removed and `target` is untouched; on
    success the old `target` (if any) is replaced whole, so no file of the previous contents survives.

    The temporary folder is `.NAME.tmp-PID-XXXXXXXX` beside target (PID: this process), the old one, during the
    swap, `.NAME.old.PID`. A run killed outright (SIGKILL, power loss) cannot remove them: the next AtomicDir on the
    same target (or clean_stale(target)) removes those whose process is gone, and a target left missing between the
    two renames of the swap gets its old folder back. Signals are held during the swap itself."""

    def __init__(self, target):
        self.target = Path(target)

    def __enter__(self) -> Path:
        self.target.parent.mkdir(parents=True, exist_ok=True)
        clean_stale(self.target)
        self.tmp = Path(tempfile.mkdtemp(dir=self.target.parent, prefix=f".{self.target.name}.tmp-{os.getpid()}-"))
        return self.tmp

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return False
        old = None
        # No Ctrl-C or SIGTERM between the two renames (they arrive once the target is back in place).
        held = signal.pthread_sigmask(signal.SIG_BLOCK, _HELD_SIGNALS) if _can_hold_signals() else None
        try:
            if self.target.exists():
                old = self.target.with_name(f".{self.target.name}.old.{os.getpid()}")
                os.replace(self.target, old)  # a crash before the next rename: clean_stale puts old back
            os.replace(self.tmp, self.target)
        finally:
            if held is not None:
                signal.pthread_sigmask(signal.SIG_SETMASK, held)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return False


_HELD_SIGNALS = {signal.SIGINT, signal.SIGTERM}


def _can_hold_signals() -> bool:
    return hasattr(signal, "pthread_sigmask") and threading.current_thread() is threading.main_thread()


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def stale_siblings(target) -> list[Path]:
    """What AtomicDir runs on `target` killed outright left beside it: `.NAME.tmp-PID-*` and `.NAME.old.PID` of
    processes that are gone, and `.NAME.XXXXXXXX.tmp` of earlier versions of this module (no PID in the name)."""
    target = Path(target)
    if not target.parent.is_dir():
        return []
    name = re.escape(target.name)
    with_pid = re.compile(rf"\.{name}\.(?:tmp-(\d+)-[A-Za-z0-9_]+|old\.(\d+))")
    legacy = re.compile(rf"\.{name}\.[A-Za-z0-9_]{{8}}\.tmp")
    stale = []
    for path in target.parent.iterdir():
        match = with_pid.fullmatch(path.name)
        if match and not _pid_alive(int(match.group(1) or match.group(2))) or legacy.fullmatch(path.name):
            stale.append(path)
    return sorted(stale)


def clean_stale(target) -> list[Path]:
    """Remove stale_siblings(target); returns what was removed. When the target itself is missing because its run
    was killed between the swap's two renames, the previous folder (`.NAME.old.PID`) is put back first."""
    target = Path(target)
    stale = stale_siblings(target)
    if not target.exists():
        olds = [p for p in stale if ".old." in p.name[len(target.name) + 1:] and p.is_dir()]
        if olds:
            os.replace(olds[-1], target)
            stale.remove(olds[-1])
    for path in stale:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    return stale
