"""Atomic writes: a result file or folder is either the old complete one or the new complete one, never half.

Everything the project writes for a user (evaluation JSON, tables, benchmark reports, checkpoints) goes through
here: the data is written to a temporary name in the same folder (same file system, so the rename is atomic),
flushed to disk, then renamed over the target. A job killed at any moment leaves no truncated file behind.
"""
import json
import os
import shutil
import tempfile
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
    On an exception the temporary folder is removed and `target` is untouched; on success the old `target`
    (if any) is replaced whole, so no file of the previous contents survives."""

    def __init__(self, target):
        self.target = Path(target)

    def __enter__(self) -> Path:
        self.target.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(dir=self.target.parent, prefix=f".{self.target.name}.", suffix=".tmp"))
        return self.tmp

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return False
        old = None
        if self.target.exists():
            old = self.target.with_name(f".{self.target.name}.old.{os.getpid()}")
            os.replace(self.target, old)  # two renames: a crash between them leaves the new folder at tmp, the old at old
        os.replace(self.tmp, self.target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return False
