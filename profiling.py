"""--profile NAME: a torch.profiler trace, a key-averages table and (CUDA) a memory timeline under outputs/, each
written atomically, with the profiler's own log lines kept out of streamed text."""
import contextlib
import os
import re
import sys
import tempfile
from pathlib import Path

import tp
from atomic import atomic_write_text, check_writable_file

OUTPUTS = Path(__file__).resolve().parent / "outputs"
PROFILE_NAME = re.compile(r"[A-Za-z0-9._-]+")
PROFILE_SUFFIXES = ("_trace.json", "_table.txt", "_memory.html")
# Kineto (torch.profiler's C++ core) logs `USDT:2026-01-01 12:00:00 123:123 File.cpp:52] profiler_start` lines.
KINETO_LOG_LINE = re.compile(r"[A-Z]+:\d{4}-\d\d-\d\d \d\d:\d\d:\d\d \d+:\d+ \S+:\d+\] ")


def check_profile_name(name: str):
    """A profile name is a file-name stem inside outputs/: checked before any work, so no run ends by failing to
    write (a missing folder) or writes outside outputs/ (a path)."""
    if not PROFILE_NAME.fullmatch(name) or name in (".", ".."):
        raise ValueError(f"--profile {name!r} is not a name: use letters, digits and - _ . only (no folders); "
                         "the files go to outputs/NAME_trace.json, outputs/NAME_table.txt, ...")
    for suffix in PROFILE_SUFFIXES:
        check_writable_file(OUTPUTS / f"{name}{suffix}")


@contextlib.contextmanager
def quiet_profiler_logs():
    """Hold stderr (the file descriptor: Kineto writes from C++) in a file while the profiler starts, stops and
    exports, then pass on every line that is not Kineto's own log, so none lands in the middle of streamed text."""
    sys.stderr.flush()
    try:
        saved = os.dup(2)
    except OSError:  # no stderr to hold
        yield
        return
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            held.seek(0)
            kept = [line for line in held.read().decode(errors="replace").splitlines(keepends=True)
                    if not KINETO_LOG_LINE.match(line)]
            sys.stderr.write("".join(kept))
            sys.stderr.flush()


def export_atomically(path: Path, export):
    """export(name) writes a whole file at `name`; it replaces `path` only once complete (same folder, one rename).
    The temporary name keeps path's suffix: the profiler picks the format from it."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=path.suffix)
    os.close(fd)
    try:
        export(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def maybe_profile(name, device, written: list = None):
    """With --profile NAME: a Chrome/Perfetto trace, a key-averages table and (CUDA) a memory timeline in outputs/,
    each written atomically. The files written are appended to `written` when given (the caller reports them after
    its own output), else named on stderr."""
    if not name or not tp.is_main():  # tensor parallel: rank 0's profile
        yield
        return
    check_profile_name(name)
    from torch.profiler import ProfilerActivity, profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    prof = profile(activities=activities, record_shapes=True, profile_memory=True, with_stack=True, with_flops=True)
    with quiet_profiler_logs():
        prof.start()
    try:
        yield
    finally:
        with quiet_profiler_logs():
            prof.stop()
    paths = [OUTPUTS / f"{name}{suffix}" for suffix in PROFILE_SUFFIXES[:3 if device.type == "cuda" else 2]]
    sort_by = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    with quiet_profiler_logs():
        export_atomically(paths[0], prof.export_chrome_trace)
        atomic_write_text(paths[1], prof.key_averages().table(sort_by=sort_by, row_limit=40))
        if device.type == "cuda":
            export_atomically(paths[2], lambda tmp: prof.export_memory_timeline(tmp, device=str(device)))
    names = [str(path.relative_to(OUTPUTS.parent)) for path in paths]
    if written is None:
        print(f"profile: wrote {', '.join(names)} (open the trace in https://ui.perfetto.dev)", file=sys.stderr)
    else:
        written.extend(names)
