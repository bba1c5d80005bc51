"""scripts/launch.py and the Slurm jobs that use it (scripts/slurm/tp.sbatch, tp_multinode.sbatch): the exact
torchrun command lines (--dry-run, and the sbatch files run with stand-ins for srun and scontrol); then real
2-rank runs on the CPU through the same launcher: generate.py and scripts/evaluate.py give what one process gives,
printed once and written by rank 0 alone, and a rank killed mid-run ends the job in a few seconds with one line from
the survivor and one from the launcher, no traceback.

The runs use a tiny random checkpoint (4 query heads, 2 KV heads, SmolLM2's tokenizer) written here."""
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

REPO_DIR = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_DIR / "scripts"))
import evaluate  # noqa: E402
import profiling
import generate
from checkpoint import default_checkpoint_path, write_checkpoint  # noqa: E402
from model import ModelArgs, Transformer  # noqa: E402

PY = sys.executable
TINY = ModelArgs(vocab_size=49152, dim=64, n_layer=2, n_head=4, n_kv_head=2, intermediate_size=128, head_dim=16,
                 max_position_embeddings=4096, tie_word_embeddings=True)
GENERATE = ["--prompt", "Once upon a time,", "--max_new_tokens", "12", "--device", "cpu"]
STRATEGY = ["quantize_kv", "--sink_size", "2", "--window_size", "4", "--bits", "4", "--group_size", "8"]


def dry_run(argv, env=None) -> list[str]:
    out = subprocess.run([PY, "scripts/launch.py", "--dry-run", *argv], cwd=REPO_DIR, capture_output=True,
                         text=True, env=env or {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")})
    assert out.returncode == 0, out.stderr
    return shlex.split(out.stdout)


def slurm_env(tmp_path, nodes: int, **extra) -> dict:
    """A Slurm job's environment, with stand-ins on PATH: scontrol names the nodes, srun runs its command once
    (as on the first node)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "scontrol").write_text("#!/bin/sh\n[ \"$1 $2 $3\" = 'show hostnames gpu[07-08]' ] && "
                                      "printf 'gpu07\\ngpu08\\n'\n")
    (bin_dir / "srun").write_text('#!/bin/bash\nwhile [[ "$1" == --* ]]; do shift; done\nexec "$@"\n')
    for tool in ("scontrol", "srun"):
        (bin_dir / tool).chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(PATH=f"{bin_dir}:{env['PATH']}", SLURM_JOB_ID="123456", SLURM_JOB_NUM_NODES=str(nodes),
               SLURM_JOB_NODELIST="gpu[07-08]" if nodes > 1 else "gpu07", SLURM_SUBMIT_DIR=str(REPO_DIR), **extra)
    return env


# ---------------------------------------------------------------- command lines


def test_dry_run_one_node():
    assert dry_run(["--nproc_per_node", "8", "generate.py", "--prompt", "hi", "quantize_kv", "--bits", "4"]) == [
        PY, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1", "--nproc_per_node", "8",
        "--max_restarts", "0", "generate.py", "--prompt", "hi", "quantize_kv", "--bits", "4"]


def test_dry_run_several_nodes():
    assert dry_run(["--nnodes", "2", "--nproc_per_node", "gpu", "--rdzv_endpoint", "node1:29400", "--rdzv_id", "7",
                    "scripts/evaluate.py", "full", "--json", "o.json"]) == [
        PY, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "gpu", "--max_restarts", "0",
        "--rdzv_backend", "c10d", "--rdzv_endpoint", "node1:29400", "--rdzv_id", "7",
        "-m", "scripts.evaluate", "full", "--json", "o.json"]


@pytest.mark.parametrize("script", [["scripts/bench_decode.py"], ["-m", "scripts.bench_decode"]])
def test_package_scripts_run_as_modules(script):
    """A script of the scripts package runs as its module under torchrun (as a file it would not find its
    siblings), named either way."""
    assert dry_run(["--nproc_per_node", "2", *script, "--tiny"])[-5:] == [
        "--max_restarts", "0", "-m", "scripts.bench_decode", "--tiny"]


def test_slurm_jobs_build_the_torchrun_commands(tmp_path):
    """The sbatch files, run as Slurm would on the first node (LAUNCH_ARGS=--dry-run): one node is torchrun
    --standalone over SLURM_GPUS_ON_NODE ranks; several nodes meet at the first host of `scontrol show hostnames`,
    on the port the job id gives, with the job id as rendezvous id; the script's arguments pass through."""
    one = subprocess.run(["bash", "scripts/slurm/tp.sbatch", "generate.py", "--prompt", "a b", "compress_kv"],
                         cwd=REPO_DIR, capture_output=True, text=True,
                         env=slurm_env(tmp_path, 1, SLURM_GPUS_ON_NODE="8", LAUNCH_ARGS="--dry-run"))
    assert one.returncode == 0, one.stderr
    venv_python = str(REPO_DIR / ".venv" / "bin" / "python")  # scripts/slurm/env.sh's
    assert shlex.split(one.stdout) == [
        venv_python, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1", "--nproc_per_node", "8",
        "--max_restarts", "0", "generate.py", "--prompt", "a b", "compress_kv"]
    several = subprocess.run(["bash", "scripts/slurm/tp_multinode.sbatch", "scripts/evaluate.py", "quantize_kv",
                              "--bits", "4"], cwd=REPO_DIR, capture_output=True, text=True,
                             env=slurm_env(tmp_path, 2, LAUNCH_ARGS="--dry-run"))
    assert several.returncode == 0, several.stderr
    assert shlex.split(several.stdout) == [
        venv_python, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "gpu",
        "--max_restarts", "0", "--rdzv_backend", "c10d", "--rdzv_endpoint", f"gpu07:{20000 + 123456 % 10000}",
        "--rdzv_id", "123456", "-m", "scripts.evaluate", "quantize_kv", "--bits", "4"]


@pytest.mark.parametrize("argv, message", [
    (["--nproc_per_node", "2"], "name the script to run"),
    (["--nproc_per_node", "2", "nothere.py"], "nothere.py does not exist"),
    (["--nproc_per_node", "2", "-m", "json.tool"], "-m takes a module of the scripts package"),
    (["--nproc_per_node", "2", "-m", "scripts.nothere"], "scripts/nothere.py does not exist"),
    (["generate.py"], "give --nproc_per_node N"),
    (["--nnodes", "2", "--nproc_per_node", "2", "generate.py"], "needs the rendezvous host"),
    (["--slurm", "generate.py"], "--slurm outside a Slurm job"),
    (["--nproc_per_node", "0", "generate.py"], "--nproc_per_node '0' is not a number of ranks"),
    (["--nproc_per_node", "abc", "generate.py"], "--nproc_per_node 'abc' is not a number of ranks"),
    (["--nproc_per_node", "-2", "generate.py"], "--nproc_per_node '-2' is not a number of ranks"),
    (["--nnodes", "0", "--nproc_per_node", "2", "generate.py"], "--nnodes 0 is not a number of nodes"),
    (["--nnodes", "2", "--nproc_per_node", "2", "--rdzv_endpoint", "h:x", "generate.py"], "the port after ':'"),
])
def test_bad_launch_is_one_line(argv, message):
    """Refused before anything runs, with and without --dry-run (which never prints a command torchrun refuses)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    for dry in (["--dry-run"], []):
        out = subprocess.run([PY, "scripts/launch.py", *dry, *argv], cwd=REPO_DIR, capture_output=True,
                             text=True, env=env, timeout=120)
        assert out.returncode != 0 and out.stderr.count("\n") == 1 and message in out.stderr, out.stderr
        assert out.stderr.startswith("error: ") and out.stdout == "", out.stdout


def test_bad_slurm_gpus_is_one_line(tmp_path):
    out = subprocess.run([PY, "scripts/launch.py", "--slurm", "--dry-run", "generate.py"], cwd=REPO_DIR,
                         capture_output=True, text=True, env=slurm_env(tmp_path, 1, SLURM_GPUS_ON_NODE="0"))
    assert out.returncode != 0 and out.stderr.count("\n") == 1 and out.stdout == "", out.stderr
    assert "SLURM_GPUS_ON_NODE '0' is not a number of ranks" in out.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a node without a GPU")
def test_gpu_ranks_without_a_gpu_is_one_line():
    out = subprocess.run([PY, "scripts/launch.py", "--nproc_per_node", "gpu", "generate.py"], cwd=REPO_DIR,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and out.stderr.count("\n") == 1 and "Traceback" not in out.stderr, out.stderr
    assert "--nproc_per_node gpu, but this node has no visible GPU" in out.stderr


# ---------------------------------------------------------------- real runs: 2 ranks on the CPU


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model = Transformer(TINY)
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(1.0) if p.ndim == 1 else p.normal_(0.0, 0.1)
    folder = tmp_path_factory.mktemp("launch") / "tiny"
    write_checkpoint(folder, TINY, model.state_dict())
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(default_checkpoint_path().parent / name, folder / name)
    return folder / "model.pth"


def launched(argv: list[str], **env) -> subprocess.CompletedProcess:
    return subprocess.run([PY, "scripts/launch.py", "--nproc_per_node", "2", *argv], cwd=REPO_DIR,
                          capture_output=True, text=True, timeout=300, env=dict(os.environ, **env))


def test_generate_over_two_ranks(tiny_checkpoint, tmp_path, capsys):
    """The completion (tokens) is the single process's; the report is printed once, with the split's line and
    rank 0's KV bytes: half the single process's (1 of the 2 KV heads)."""
    out = launched(["generate.py", "--checkpoint_path", str(tiny_checkpoint), *GENERATE,
                    "--out", str(tmp_path / "tp.jsonl"), *STRATEGY])
    assert out.returncode == 0, out.stderr
    generate.main(["--checkpoint_path", str(tiny_checkpoint), *GENERATE, "--out", str(tmp_path / "one.jsonl"),
                   *STRATEGY])
    single = capsys.readouterr().out
    assert json.loads((tmp_path / "tp.jsonl").read_text())["tokens"] == \
        json.loads((tmp_path / "one.jsonl").read_text())["tokens"]
    assert out.stdout.count("prompt tokens:") == 1 and out.stdout.count("wrote 1 completion") == 1
    assert "tensor parallel: 2 ranks (gloo); each holds 2 of 4 query heads, 1 of 2 KV heads" in out.stdout

    def kv_mib(text):
        return float(text.split("KV cache: ")[1].split(" MiB")[0])
    assert kv_mib(out.stdout) == pytest.approx(kv_mib(single) / 2, abs=0.01)
    assert "Traceback" not in out.stderr


def test_evaluate_over_two_ranks(tiny_checkpoint, tmp_path, capsys):
    """scripts/evaluate.py under the launcher: the scores and generated texts of one process, one summary line;
    the full cache's ROUGE-L reference is computed by both ranks together and written by rank 0."""
    argv = ["--checkpoint_path", str(tiny_checkpoint), "--device", "cpu", "--max_tokens", "12",
            "--max_position", "96", "--rouge_prompts", "2", "--prompt_tokens", "16", "--new_tokens", "4",
            "--prefill_chunk", "8", "--retrieval_lengths", "80", "--retrieval_depths", "0.5", *STRATEGY]
    rouge_dir = profiling.OUTPUTS / "rouge_full"
    before = set(rouge_dir.glob("*.json")) if rouge_dir.is_dir() else set()
    try:
        out = launched(["scripts/evaluate.py", *argv, "--json", str(tmp_path / "tp.json")])
        assert out.returncode == 0, out.stderr
        evaluate.main([*argv, "--json", str(tmp_path / "one.json")])
    finally:  # the reference files this test made (outputs/ is ignored by git, but it is the user's folder)
        for path in set(rouge_dir.glob("*.json")) - before:
            if str(tiny_checkpoint.parent) in path.read_text():
                path.unlink()
    capsys.readouterr()
    tp_result, single = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("tp", "one"))
    assert tp_result["perplexity"] == pytest.approx(single["perplexity"], rel=1e-5)
    assert tp_result["continuations"] == single["continuations"]
    assert [r["output"] for r in tp_result["retrieval_samples"]] == [r["output"] for r in single["retrieval_samples"]]
    assert tp_result["kv_bytes_full"] * 2 == single["kv_bytes_full"]  # rank 0's KV heads: 1 of 2
    assert single["kv_bytes"] / 2 <= tp_result["kv_bytes"] < single["kv_bytes"]  # (slot positions are per token)
    assert out.stdout.count("perplexity") == 1


def test_a_killed_rank_ends_the_job_with_one_line(tiny_checkpoint):
    """Rank 1 is killed (SIGKILL) while generating: rank 0 says it lost contact, the launcher names the killed
    rank, and the job ends in seconds (not after the collective timeout), without a traceback."""
    cmd = [PY, "scripts/launch.py", "--nproc_per_node", "2", "generate.py", "--checkpoint_path",
           str(tiny_checkpoint), "--prompt", "Once upon a time,", "--max_new_tokens", "4000", "--device", "cpu"]
    proc = subprocess.Popen(cmd, cwd=REPO_DIR, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, TP_TIMEOUT_S="120"))
    try:
        for line in proc.stdout:  # rank 0 reports the split once the group is up and the model loaded
            if line.startswith("tensor parallel:"):
                break
        time.sleep(0.5)
        rank1 = next(pid for pid in map(int, subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True,
                                                             text=True).stdout.split())
                     if b"RANK=1\0" in Path(f"/proc/{pid}/environ").read_bytes())
        killed_at = time.monotonic()
        os.kill(rank1, 9)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert time.monotonic() - killed_at < 60
    assert proc.returncode == 1
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err, err
    assert any(line.startswith("error: lost contact with another rank") for line in lines), err
    assert lines[-1].startswith("error: rank 1 was killed by SIGKILL"), err
    assert len([line for line in lines if line.startswith(("error:", "rank "))]) == 2, err


# A stand-in for a tensor-parallel script (no model: only the timing of a failure matters). Rank 1 is killed
# (SIGKILL) at once; rank 0 notices after `delay` seconds, as a rank in the middle of a step notices at its next
# collective, and ends with its own line; torchrun's SIGTERM would make it say something else.
FAILING_RANKS = """
import os, signal, sys, time
from pathlib import Path
folder, delay = Path(sys.argv[1]), float(sys.argv[2])
def stopped(*_):
    sys.stderr.write("error: stopped by the launcher\\n")
    sys.stderr.flush()
    os._exit(1)
signal.signal(signal.SIGTERM, stopped)
if os.environ["RANK"] == "1":
    (folder / "rank1_dies").touch()
    os.kill(os.getpid(), signal.SIGKILL)
while not (folder / "rank1_dies").exists():
    time.sleep(0.005)
time.sleep(delay)
sys.stderr.write("error: lost contact with another rank (simulated)\\n")
sys.stderr.flush()
os._exit(1)
"""


@pytest.mark.parametrize("delay", [0.0, 1.5])
def test_a_killed_rank_is_named_last_whatever_the_timing(tmp_path, delay):
    """The outcome does not depend on timing: the survivor's own line first (it is given time to end by itself,
    not SIGTERMed at once), then the launcher's line naming the killed rank, even when torchrun sees the survivor's
    exit (code 1) in the same poll as the killed rank's."""
    script = tmp_path / "ranks.py"
    script.write_text(FAILING_RANKS)
    out = subprocess.run([PY, "scripts/launch.py", "--nproc_per_node", "2", str(script), str(tmp_path), str(delay)],
                         cwd=REPO_DIR, capture_output=True, text=True, timeout=120)
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr
    assert len(lines) == 2, out.stderr
    assert lines[0] == "error: lost contact with another rank (simulated)", out.stderr
    assert lines[1].startswith("error: rank 1 was killed by SIGKILL"), out.stderr
