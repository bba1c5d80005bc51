"""Start a tensor-parallel job (tp.py): torchrun on this node, one rank per GPU, running generate.py,
scripts/evaluate.py or scripts/bench_decode.py with their own arguments (any strategy) passed through.

    python scripts/launch.py --nproc_per_node 8 generate.py --prompt "..." quantize_kv --bits 4
    python scripts/launch.py --nproc_per_node 3 scripts/evaluate.py --device cpu full --json out.json
    srun --ntasks-per-node=1 python scripts/launch.py --slurm generate.py ...   # in an sbatch job: one per node
    python scripts/launch.py --slurm --dry-run generate.py ...                 # print what would run

--slurm reads the job: SLURM_JOB_NUM_NODES nodes, SLURM_GPUS_ON_NODE ranks per node (else torchrun's `gpu`: every
visible GPU), and on several nodes a c10d rendezvous on the job's first node (`scontrol show hostnames
$SLURM_JOB_NODELIST`), id SLURM_JOB_ID, port 20000 + SLURM_JOB_ID % 10000 (or --rdzv_port). One node needs no
rendezvous host: torchrun --standalone. The command is `python -m torch.distributed.run ARGS SCRIPT ...`; --dry-run
prints it and exits, else it runs in this process (torch.distributed.run's own main), so that a rank that fails
ends the job with its one error line (tp.run), or, for a rank killed by a signal or exiting otherwise, one line
naming it, instead of torchrun's traceback. After a failure the other ranks get GRACE_S seconds to end by themselves
(a lost peer is their own line) before torchrun's SIGTERM, and the launcher's line comes last, once every rank ended.
"""
import argparse
import logging
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

REPO_DIR = Path(__file__).resolve().parent.parent
SCRIPTS = ("generate.py", "scripts/evaluate.py", "scripts/bench_decode.py")
DEFAULT_PORT = 29500


def slurm_job(env=os.environ) -> dict:
    """nnodes, nproc_per_node, rendezvous host and job id of the Slurm job this runs in; a ValueError outside one."""
    if "SLURM_JOB_ID" not in env:
        raise ValueError("--slurm outside a Slurm job (no SLURM_JOB_ID): run it inside sbatch/srun, or give "
                         "--nproc_per_node (and --nnodes, --rdzv_endpoint) yourself")
    nnodes = int(env.get("SLURM_JOB_NUM_NODES") or env.get("SLURM_NNODES") or 1)
    job = dict(nnodes=nnodes, job_id=env["SLURM_JOB_ID"], nproc_per_node=env.get("SLURM_GPUS_ON_NODE") or "gpu",
               head=None)
    if nnodes > 1:
        nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
        if not nodelist:
            raise ValueError("--slurm: the job has no SLURM_JOB_NODELIST: run inside the sbatch allocation")
        try:
            hosts = subprocess.run(["scontrol", "show", "hostnames", nodelist], check=True, capture_output=True,
                                   text=True).stdout.split()
        except (OSError, subprocess.CalledProcessError) as e:
            raise ValueError(f"--slurm: `scontrol show hostnames {nodelist}` failed ({e}): run on a Slurm node")
        if not hosts:
            raise ValueError(f"--slurm: `scontrol show hostnames {nodelist}` named no host")
        job["head"] = hosts[0]
    return job


NPROC_WORDS = ("gpu", "cpu", "auto")  # torchrun's own words for "as many as this node has"


def check_nproc(value, option: str = "--nproc_per_node") -> str:
    """value as torchrun takes it (a number >= 1, or gpu, cpu, auto), else a one-line ValueError: checked before
    anything runs, so that --dry-run never prints a command torchrun would refuse with a traceback."""
    text = str(value).strip()
    if text in NPROC_WORDS:
        return text
    try:
        number = int(text)
    except ValueError:
        number = None
    if number is None or number < 1:
        raise ValueError(f"{option} {value!r} is not a number of ranks: give a whole number >= 1 (ranks on this node), "
                         f"or gpu (one per visible GPU)")
    return str(number)


def torchrun_args(nnodes: int, nproc_per_node, head=None, port: int = DEFAULT_PORT, job_id=None) -> list[str]:
    """torchrun's own arguments: --standalone on one node; a c10d rendezvous at head:port on several. No restarts:
    a failed rank ends the job (a generation restarted from scratch would print its text twice)."""
    if nnodes < 1:
        raise ValueError(f"--nnodes {nnodes} is not a number of nodes: give a whole number >= 1")
    if not 0 < port < 65536:
        raise ValueError(f"rendezvous port {port} is not a TCP port: give one in 1-65535")
    nproc_per_node = check_nproc(nproc_per_node)
    common = ["--nproc_per_node", str(nproc_per_node), "--max_restarts", "0"]
    if nnodes == 1:
        return ["--standalone", "--nnodes", "1", *common]
    if not head:
        raise ValueError(f"--nnodes {nnodes} needs the rendezvous host: give --rdzv_endpoint HOST[:PORT] (or --slurm)")
    return ["--nnodes", str(nnodes), *common, "--rdzv_backend", "c10d", "--rdzv_endpoint", f"{head}:{port}",
            "--rdzv_id", str(job_id or "kvcache")]


def command(torchrun: list[str], script_argv: list[str]) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", *torchrun, *as_module(script_argv)]


def as_module(script_argv: list[str]) -> list[str]:
    """generate.py runs as a file; a script of the scripts package runs as its module (`-m scripts.evaluate`), as
    it does outside the launcher: the package's scripts import each other as `scripts.x`, which a file would not find."""
    script = Path(script_argv[0])
    if script.parent.name == "scripts" and script.suffix == ".py":
        return ["-m", f"scripts.{script.stem}", *script_argv[1:]]
    return script_argv


def module_as_path(argv: list[str]) -> list[str]:
    """python -m's spelling of the script (`-m scripts.evaluate ARGS`) as its path (`scripts/evaluate.py ARGS`),
    before argparse sees it (it would take -m for an option of the launcher). The launcher's own options never take
    -m as a value, so the first -m starts the script."""
    for i, arg in enumerate(argv):
        if arg in ("-m", "--module"):
            if i + 1 == len(argv) or not argv[i + 1].startswith("scripts."):
                raise ValueError("-m takes a module of the scripts package, e.g. -m scripts.evaluate")
            return [*argv[:i], f"{argv[i + 1].replace('.', '/')}.py", *argv[i + 2:]]
    return argv


def check_script(script_argv: list[str]) -> list[str]:
    if not script_argv:
        raise ValueError(f"name the script to run: one of {', '.join(SCRIPTS)}, then its arguments")
    script = Path(script_argv[0])
    if not script.is_file():
        raise ValueError(f"{script} does not exist: run one of {', '.join(SCRIPTS)} (paths from the repository "
                         f"root, {REPO_DIR})")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.error = lambda message: sys.exit(f"error: {message} (see --help)")
    p.add_argument("--nproc_per_node", default=None,
                   help="ranks on this node: a number, or gpu (every visible GPU; the default with --slurm)")
    p.add_argument("--nnodes", type=int, default=1, help="nodes, each running this launcher (default 1)")
    p.add_argument("--rdzv_endpoint", default=None, help="HOST[:PORT] of the c10d rendezvous (several nodes)")
    p.add_argument("--rdzv_id", default=None, help="rendezvous id shared by the nodes (--slurm: the job id)")
    p.add_argument("--rdzv_port", type=int, default=None,
                   help=f"rendezvous port (default {DEFAULT_PORT}; --slurm: 20000 + job id %% 10000)")
    p.add_argument("--slurm", action="store_true", help="take nodes, GPUs and the rendezvous host from the Slurm job")
    p.add_argument("--dry-run", "--dry_run", dest="dry_run", action="store_true",
                   help="print the command and exit")
    p.add_argument("script", nargs=argparse.REMAINDER,
                   help=f"the script ({', '.join(SCRIPTS)}) and its arguments, passed through")
    return p


def plan(args, env=os.environ) -> list[str]:
    """The command this node runs."""
    check_script(args.script)
    if args.nproc_per_node is not None:
        check_nproc(args.nproc_per_node)
    if args.slurm:
        job = slurm_job(env)
        if args.nproc_per_node is None:
            check_nproc(job["nproc_per_node"], "SLURM_GPUS_ON_NODE")
        port = args.rdzv_port or 20000 + int(job["job_id"]) % 10000
        return command(torchrun_args(job["nnodes"], args.nproc_per_node or job["nproc_per_node"], job["head"], port,
                                     args.rdzv_id or job["job_id"]), args.script)
    if args.nproc_per_node is None:
        raise ValueError("give --nproc_per_node N (ranks on this node; gpu: one per visible GPU), or --slurm")
    head, _, port = (args.rdzv_endpoint or "").partition(":")
    if port and not port.isdigit():
        raise ValueError(f"--rdzv_endpoint {args.rdzv_endpoint!r}: the port after ':' is not a number: give "
                         "HOST[:PORT]")
    port = int(port) if port else args.rdzv_port or DEFAULT_PORT
    return command(torchrun_args(args.nnodes, args.nproc_per_node, head or None, port, args.rdzv_id), args.script)


# Seconds the other ranks get to notice a failed rank and end with their own line (a lost peer is seen at the next
# collective, at once on gloo) before torchrun stops them with SIGTERM.
GRACE_S = 10.0


def _patch_close(grace_s: float, failed_first: set):
    """Make torchrun's worker shutdown deterministic. torchrun polls its ranks, and when one has failed it SIGTERMs
    the others at once: a surviving rank then ends with "stopped by the launcher" or "lost contact" depending on
    which it met first, and it may have exited (code 1) in the same poll as the rank that died, so torchrun's "first
    failure" is whichever the clock ties in favour of. Here the shutdown after a failure first waits up to grace_s
    for the ranks to end by themselves, and the pids of the ranks that had failed before it (the cause, not the
    ranks the launcher stopped) are kept in failed_first. Returns a function that undoes the patch."""
    from torch.distributed.elastic.multiprocessing import api

    close = api.SubprocessContext._close

    def patched(self, death_sig, timeout=30):
        failures = getattr(self, "_failures", None) or {}
        failed_first.update(f.pid for f in failures.values())
        if failures:
            end = time.monotonic() + grace_s
            for handler in self.subprocess_handlers.values():
                while handler.proc.poll() is None and time.monotonic() < end:
                    time.sleep(0.02)
        return close(self, death_sig, timeout)

    api.SubprocessContext._close = patched
    return lambda: setattr(api.SubprocessContext, "_close", close)


def failure_line(failures: dict, failed_first: set) -> str | None:
    """The launcher's one line for a failed job, or None when every rank that failed by itself exited with 1 (the
    ranks of this project's scripts exit with 1 after their own one error line). failures: torchrun's {global rank:
    ProcessFailure}; failed_first: the pids that had failed before the launcher stopped the others. The rank named
    is one of those that was killed by a signal or exited otherwise (the lowest such rank), never one the launcher
    stopped, whatever torchrun's timestamps say."""
    first = {rank: f for rank, f in failures.items() if f.pid in failed_first} or failures
    abnormal = sorted(rank for rank, f in first.items() if f.exitcode != 1)
    if not abnormal:
        return None
    rank, failure = abnormal[0], first[abnormal[0]]
    how = (f"was killed by {failure.signal_name()}" if failure.exitcode < 0
           else f"exited with code {failure.exitcode}")
    others = len(failures) - 1
    return (f"error: rank {rank} {how} (its own error, if it printed one, is above); the job stopped"
            + (f", {others} other rank(s) with it" if others else ""))


def run_torchrun(cmd: list[str], grace_s: float = GRACE_S) -> int:
    """Run `python -m torch.distributed.run ...` (cmd) in this process; a failed rank is one line on stderr, printed
    after every rank has ended (torchrun returns only then), so it is the last line."""
    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    # torchrun's agent logs each failure and its OMP_NUM_THREADS banner; the line below says what failed.
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    logging.getLogger("torch.distributed.run").setLevel(logging.CRITICAL)
    failed_first = set()
    unpatch = _patch_close(grace_s, failed_first)
    try:
        torchrun.main(cmd[3:])
    except ChildFailedError as e:
        line = failure_line(e.failures, failed_first)
        if line:
            sys.stderr.flush()
            print(line, file=sys.stderr)
        return 1
    finally:
        unpatch()
    return 0


def main(argv=None) -> int:
    try:
        args = build_parser().parse_args(module_as_path(sys.argv[1:] if argv is None else argv))
        cmd = plan(args)
    except ValueError as e:
        sys.exit(f"error: {e}")
    if args.dry_run:
        print(shlex.join(cmd))
        return 0
    nproc = cmd[cmd.index("--nproc_per_node") + 1]
    if nproc == "gpu":  # torchrun would end in a traceback ("Cuda is not available")
        import torch
        if not torch.cuda.is_available():
            sys.exit("error: --nproc_per_node gpu, but this node has no visible GPU: give the number of ranks "
                     "(e.g. --nproc_per_node 2; tensor parallel then runs on the CPU with --device cpu)")
    return run_torchrun(cmd)


if __name__ == "__main__":
    sys.exit(main())
