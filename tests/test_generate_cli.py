"""generate.py on the command line: every bad input ends with exactly one `error: ...` line on stderr naming the
fix, exit code != 0, no traceback and nothing written; and the everyday features (batch rows, --chat, --prompt @FILE
and -, an empty prompt, top-k 0, --profile output kept apart from the text, --compile timed apart) work.

The runs use a tiny random checkpoint (2 layers, dim 64, SmolLM2's tokenizer) written here, never the real model,
and run two at a time: each is a fresh Python importing torch."""
import concurrent.futures
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import cli_options
import memory
import runner
import generate
from checkpoint import write_checkpoint
from conftest import in_process
from model import ModelArgs, Transformer
from tokenizer import load_tokenizer, save_gguf_tokenizer

REPO_DIR = Path(__file__).resolve().parent.parent
TINY = ModelArgs(vocab_size=49152, dim=64, n_layer=2, n_head=2, n_kv_head=1, intermediate_size=128, head_dim=32,
                 max_position_embeddings=256, tie_word_embeddings=True)
PROFILE = f"test_generate_cli_{os.getpid()}"  # outputs/PROFILE_*: unique, removed after the module


def tiny_model(args: ModelArgs = TINY) -> Transformer:
    """Small random weights (as bench_decode's): near-uniform next-token distributions, so sampled rows differ."""
    torch.manual_seed(0)
    model = Transformer(args)
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(1.0) if p.ndim == 1 else p.normal_(0.0, 0.02)
    return model.eval().requires_grad_(False)


def write_tiny(directory: Path, tokenizer_dir: Path, args: ModelArgs = TINY, **config_changes) -> Path:
    """A gpt-fast layout checkpoint (model.pth + model_args.json) with the tokenizer files of tokenizer_dir;
    config_changes edit its tokenizer_config.json (None removes a key)."""
    write_checkpoint(directory, args, tiny_model(args).state_dict())
    shutil.copyfile(tokenizer_dir / "tokenizer.json", directory / "tokenizer.json")
    config = json.loads((tokenizer_dir / "tokenizer_config.json").read_text())
    for key, value in config_changes.items():
        config.pop(key) if value is None else config.update({key: value})
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    return directory / "model.pth"


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, smollm2_gguf_path):
    root = tmp_path_factory.mktemp("generate_cli")
    save_gguf_tokenizer(smollm2_gguf_path, root / "smollm2_tokenizer")  # SmolLM2's, with its ChatML template
    tokenizer_dir = root / "smollm2_tokenizer"
    paths = {
        "tiny": write_tiny(root / "tiny", tokenizer_dir),
        "no_template": write_tiny(root / "no_template", tokenizer_dir, chat_template=None),
        "no_bos": write_tiny(root / "no_bos", tokenizer_dir, bos_token=None),
        "small_vocab": write_tiny(root / "small_vocab", tokenizer_dir,
                                  ModelArgs(**{**TINY.to_dict(), "vocab_size": 256})),
    }
    (root / "empty").mkdir()
    (root / "notes.txt").write_text("not a checkpoint\n")
    (root / "prompt.txt").write_text("Über the hills,\n", encoding="utf-8")
    (root / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    paths["root"] = root
    yield paths
    for path in (REPO_DIR / "outputs").glob(f"{PROFILE}*"):
        path.unlink()


def cases(c: dict) -> dict:
    """name -> (generate.py arguments, standard input). Bad inputs first, then runs that must succeed."""
    tiny, root = str(c["tiny"]), c["root"]
    fast = ["--checkpoint_path", tiny, "--max_new_tokens", "4"]
    return {
        # (1) devices
        "device_unknown": (fast + ["--device", "tpu9"], None),
        "device_type": (fast + ["--device", "meta"], None),
        # (2) sampling
        "top_k_negative": (fast + ["--temperature", "0.8", "--top_k", "-1"], None),
        "temperature_negative": (fast + ["--temperature", "-1"], None),
        "temperature_nan": (fast + ["--temperature", "nan"], None),
        # (3) memory
        "max_seq_length_huge": (fast + ["--max_seq_length", str(10**12)], None),
        "batch_size_huge": (fast + ["--batch_size", str(10**9)], None),
        # (4) empty prompt, no BOS
        "empty_prompt_no_bos": (["--checkpoint_path", str(c["no_bos"]), "--prompt", ""], None),
        # (5) profile names
        "profile_parent": (fast + ["--profile", f"../../{PROFILE}_x"], None),
        "profile_subfolder": (fast + ["--profile", f"sub/{PROFILE}_x"], None),
        "profile_empty": (fast + ["--profile", ""], None),
        # (8) chat
        "chat_without_template": (["--checkpoint_path", str(c["no_template"]), "--chat"], None),
        "system_without_chat": (fast + ["--system", "Be brief."], None),
        # (9) prompt files
        "prompt_file_missing": (fast + ["--prompt", f"@{root / 'missing.txt'}"], None),
        "prompt_file_folder": (fast + ["--prompt", f"@{root}"], None),
        "prompt_file_not_utf8": (fast + ["--prompt", f"@{root / 'latin1.txt'}"], None),
        "prompt_stdin_not_utf8": (fast + ["--prompt", "-"], "caf\xe9".encode("latin-1")),
        # (10) numbers out of range, paths that are not what they claim, contradictions
        "max_new_tokens_0": (fast + ["--max_new_tokens", "0"], None),
        "num_samples_0": (fast + ["--num_samples", "0"], None),
        "batch_size_0": (fast + ["--batch_size", "0"], None),
        "max_seq_length_0": (fast + ["--max_seq_length", "0"], None),
        "max_seq_length_short": (fast + ["--max_seq_length", "6"], None),
        "seed_too_large": (fast + ["--seed", str(2**64)], None),
        "checkpoint_missing": (["--checkpoint_path", str(root / "nope" / "model.pth")], None),
        "checkpoint_empty_folder": (["--checkpoint_path", str(root / "empty")], None),
        "checkpoint_other_file": (["--checkpoint_path", str(root / "notes.txt")], None),
        "tokenizer_of_another_model": (["--checkpoint_path", str(c["small_vocab"])], None),
        # (11) paging and continuous batching
        "num_blocks_unpaged": (fast + ["--num_blocks", "8"], None),
        "block_size_unpaged": (fast + ["--block_size", "8"], None),
        "kv_memory_and_num_blocks": (fast + ["--paged", "--num_blocks", "8", "--kv_memory_gb", "1"], None),
        "kv_memory_gb_negative": (fast + ["--paged", "--kv_memory_gb", "-1"], None),
        "kv_memory_gb_tiny": (fast + ["--paged", "--kv_memory_gb", "1e-7"], None),
        "pool_too_small": (fast + ["--paged", "--block_size", "2", "--num_blocks", "3"], None),
        "max_batch_size_without_file": (fast + ["--max_batch_size", "2"], None),
        "block_size_not_whole_groups": (fast + ["--paged", "--block_size", "7", "quantize_kv", "--bits", "4",
                                                "--sink_size", "1", "--window_size", "1"], None),
        "pool_too_small_for_the_batch": (fast + ["--paged", "--block_size", "2", "--num_blocks", "8",
                                                 "--batch_size", "3"], None),
        "max_batch_size_and_batch_size": (fast + ["--prompts_file", str(root / "prompt.txt"), "--max_batch_size",
                                                  "2", "--batch_size", "2"], None),
        # runs that succeed
        "ok_top_k_0": (fast + ["--temperature", "0.8", "--top_k", "0"], None),
        "ok_batch_rows": (fast + ["--batch_size", "3", "--temperature", "0.8", "--max_new_tokens", "6"], None),
        "ok_batch_greedy": (fast + ["--batch_size", "2"], None),
        "ok_empty_prompt": (fast + ["--prompt", ""], None),
        "ok_past_context": (fast + ["--max_seq_length", "300"], None),
        "ok_chat": (fast + ["--chat", "--prompt", "What is the capital of France?"], None),
        "ok_chat_system": (fast + ["--chat", "--system", "Answer in one word.", "--prompt", "Capital of France?"],
                           None),
        "ok_prompt_file": (fast + ["--prompt", f"@{root / 'prompt.txt'}"], None),
        "ok_prompt_stdin": (fast + ["--prompt", "-"], "Über the hills,\n".encode()),
        "ok_prompt_at": (fast + ["--prompt", "@@home, "], None),
        "ok_profile": (fast + ["--profile", PROFILE], None),
    }


# Run as real processes (standard input, stderr at the file-descriptor level, a fresh interpreter's exit): one case
# or more per item; the other cases call generate.main() in this process, which is the same code path minus the
# torch import that makes each process cost seconds on a busy two-core machine.
SUBPROCESS = {"device_unknown", "top_k_negative", "max_seq_length_huge", "empty_prompt_no_bos", "profile_parent",
              "chat_without_template", "prompt_stdin_not_utf8", "checkpoint_other_file", "ok_prompt_stdin",
              "ok_profile", "ok_batch_rows", "ok_chat"}


def run_generate(argv, stdin, cwd):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # two runs share the two cores
    return subprocess.run([sys.executable, str(REPO_DIR / "generate.py"), *argv], input=stdin, cwd=cwd, env=env,
                          capture_output=True, timeout=300)


def run_in_process(argv, cwd):
    """generate.main(argv) with what a process would show (conftest.in_process), as bytes like run_generate's."""
    result = in_process(generate.main, argv, cwd)
    return subprocess.CompletedProcess(argv, result.returncode, result.stdout.encode(), result.stderr.encode())


@pytest.fixture(scope="module")
def runs(checkpoints, tmp_path_factory):
    """Every case, each in its own empty working folder: name -> (CompletedProcess, folder). The subprocesses run
    two at a time while the in-process cases run here."""
    outputs_before = set((REPO_DIR / "outputs").iterdir())
    todo = cases(checkpoints)
    folders = {name: tmp_path_factory.mktemp(name) for name in todo}
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        futures = {name: pool.submit(run_generate, argv, stdin, folders[name])
                   for name, (argv, stdin) in todo.items() if name in SUBPROCESS}
        results = {name: run_in_process(argv, folders[name])
                   for name, (argv, stdin) in todo.items() if name not in SUBPROCESS}
        results.update({name: future.result() for name, future in futures.items()})
    new_outputs = set((REPO_DIR / "outputs").iterdir()) - outputs_before
    return {name: (result, folders[name]) for name, result in results.items()}, new_outputs


def text(stream: bytes) -> str:
    return stream.decode("utf-8")


ERRORS = {  # case -> what the one line must say
    "device_unknown": "--device 'tpu9' is not a device: use cpu, cuda or cuda:N",
    "device_type": "runs on cpu or cuda",
    "top_k_negative": "argument --top_k: must be at least 0 (0 = no top-k), got -1",
    "temperature_negative": "argument --temperature: must be a number >= 0 (0 = greedy), got -1",
    "temperature_nan": "argument --temperature: must be a number >= 0",
    "max_seq_length_huge": "but",
    "batch_size_huge": "--batch_size",
    "empty_prompt_no_bos": "the prompt is empty and this tokenizer has no BOS token to start from: give --prompt TEXT",
    "profile_parent": "is not a name: use letters, digits and - _ . only (no folders)",
    "profile_subfolder": "is not a name: use letters, digits and - _ . only (no folders)",
    "profile_empty": "is not a name",
    "chat_without_template": "--chat: this checkpoint has no chat template",
    "system_without_chat": "--system is a chat message: add --chat",
    "prompt_file_missing": "missing.txt does not exist: give an existing text file after @",
    "prompt_file_folder": "is a folder",
    "prompt_file_not_utf8": "latin1.txt is not UTF-8 text (byte 0xe9 at offset 3): convert it to UTF-8",
    "prompt_stdin_not_utf8": "standard input is not UTF-8 text (byte 0xe9 at offset 3)",
    "max_new_tokens_0": "argument --max_new_tokens: must be at least 1, got 0",
    "num_samples_0": "argument --num_samples: must be at least 1, got 0",
    "batch_size_0": "argument --batch_size: must be at least 1, got 0",
    "max_seq_length_0": "argument --max_seq_length: must be at least 1, got 0",
    "max_seq_length_short": "raise --max_seq_length",
    "seed_too_large": "argument --seed: must be between",
    "checkpoint_missing": "checkpoint not found",
    "checkpoint_empty_folder": "no checkpoint in",
    "checkpoint_other_file": "notes.txt is not a checkpoint file",
    "tokenizer_of_another_model": "belong to another model",
    "num_blocks_unpaged": "--num_blocks sizes the paged pool: add --paged",
    "block_size_unpaged": "--block_size sizes the paged pool: add --paged",
    "kv_memory_and_num_blocks": "--num_blocks and --kv_memory_gb both size the pool: give one of them",
    "kv_memory_gb_negative": "argument --kv_memory_gb: must be a number > 0, got -1",
    "kv_memory_gb_tiny": "holds 0 block(s)",
    "pool_too_small": "blocks of 2 tokens but the pool has 2: raise --num_blocks",
    "max_batch_size_without_file": "--max_batch_size admits the prompts of --prompts_file",
    "block_size_not_whole_groups": "--block_size 7: quantize_kv's blocks hold whole groups of 32 tokens",
    "pool_too_small_for_the_batch": "a batch of --batch_size 3 needs up to",
    "max_batch_size_and_batch_size": "--max_batch_size (continuous batching) replaces --batch_size",
}


@pytest.mark.parametrize("name", sorted(ERRORS))
def test_bad_input_is_one_line_error(runs, name):
    (result, folder), new_outputs = runs[0][name], runs[1]
    stderr = text(result.stderr)
    assert result.returncode != 0, stderr
    assert len(stderr.splitlines()) == 1 and stderr.startswith("error: "), stderr
    assert ERRORS[name] in stderr
    assert "Traceback" not in stderr and text(result.stdout) == ""  # failed before any generation
    assert list(folder.iterdir()) == [] and not any("_x" in path.name for path in new_outputs)


def test_memory_error_names_what_fits(runs):
    stderr = text(runs[0]["max_seq_length_huge"][0].stderr)
    need, free, fit = re.search(r"need ([\d.]+ \w+) .* but ([\d.]+ \w+) of memory is free: --max_seq_length (\d+) "
                                r"fits", stderr).groups()
    assert need.endswith("TiB") and 9 <= int(fit) < 10**12
    assert re.search(r"--batch_size \d+ fits", text(runs[0]["batch_size_huge"][0].stderr))


def ok(runs, name) -> tuple[str, str]:
    result = runs[0][name][0]
    stdout, stderr = text(result.stdout), text(result.stderr)
    assert result.returncode == 0, stderr
    return stdout, stderr


def reported(stdout: str, what: str) -> int:
    return int(re.search(rf"{what}: (\d+)", stdout).group(1))


def test_top_k_0_samples_from_all_tokens(runs):
    stdout, stderr = ok(runs, "ok_top_k_0")
    assert stderr == "" and "new tokens: 4" in stdout


def test_every_row_of_a_batch_is_shown_and_sampled_rows_differ(runs):
    stdout, _ = ok(runs, "ok_batch_rows")
    rows = re.split(r"--- row \d of 3 ---\n", stdout.split("prompt tokens:")[0])[1:]
    assert len(rows) == 3 and all(row.startswith("Once upon a time,") for row in rows)
    assert len(set(rows)) == 3, rows
    stdout, _ = ok(runs, "ok_batch_greedy")
    assert "--- row 0 of 2 ---" in stdout and "--- row 1 of 2: the same text as row 0 ---" in stdout


def test_empty_prompt_starts_from_bos(runs):
    stdout, stderr = ok(runs, "ok_empty_prompt")
    assert stderr == "" and reported(stdout, "prompt tokens") == 1


def test_max_seq_length_past_the_trained_context_warns(runs):
    stdout, stderr = ok(runs, "ok_past_context")
    assert stderr.startswith("warning: --max_seq_length 300 is past the model's trained context (256 positions)")
    assert len(stderr.splitlines()) == 1 and "for 300 tokens" in stdout


@pytest.mark.parametrize("name, system", [("ok_chat", None), ("ok_chat_system", "Answer in one word.")])
def test_chat_prompt_is_the_templates_tokens(runs, checkpoints, name, system):
    stdout, stderr = ok(runs, name)
    prompt = cases(checkpoints)[name][0][-1]
    tokenizer = load_tokenizer(checkpoints["tiny"])
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    expected = tokenizer.encode(tokenizer.apply_chat_template(messages))
    assert reported(stdout, "prompt tokens") == len(expected) and stderr == ""
    assert "chat template applied" in stdout and "<|im_start|>" not in stdout  # the answer is shown, not the template


@pytest.mark.parametrize("name", ["ok_prompt_file", "ok_prompt_stdin"])
def test_prompt_from_file_or_stdin(runs, checkpoints, name):
    stdout, _ = ok(runs, name)
    expected = load_tokenizer(checkpoints["tiny"]).encode("Über the hills,\n")
    assert reported(stdout, "prompt tokens") == len(expected)
    assert stdout.splitlines()[1] == "Über the hills,"  # the prompt is printed as read
    stdout, _ = ok(runs, "ok_prompt_at")
    assert stdout.splitlines()[1].startswith("@home, ")


def test_profile_report_comes_after_the_text(runs):
    stdout, stderr = ok(runs, "ok_profile")
    assert stderr == ""  # the profiler's own log lines (USDT:..., STAGE:...) are held back
    lines = stdout.splitlines()
    assert lines[1].startswith("Once upon a time,") and "profile" not in lines[1]
    assert lines[-1].startswith(f"profile: wrote outputs/{PROFILE}_trace.json, outputs/{PROFILE}_table.txt")
    for suffix in ("_trace.json", "_table.txt"):
        assert (REPO_DIR / "outputs" / f"{PROFILE}{suffix}").stat().st_size > 0
    assert not list((REPO_DIR / "outputs").glob(f".{PROFILE}*"))  # no temporary file left


# ---- in-process: sampling, memory arithmetic, the compile warm-up -------------------------------------------


def sampling(rows, temperature=1.0, top_k=0, top_p=1.0, seeds=None):
    seeds = range(rows) if seeds is None else seeds
    return runner.Sampling.of([(temperature, top_k, top_p, seed) for seed in seeds], "cpu")


def test_each_row_draws_its_own_sample():
    logits = torch.zeros(3, 1000)  # the same uniform distribution in every row
    draws = torch.cat([runner.sample(logits, sampling(3), torch.full((3, 1), pos)) for pos in range(4)], dim=1)
    assert len({tuple(row) for row in draws.tolist()}) == 3
    assert runner.sample(logits, sampling(3, top_k=0), torch.zeros(3, 1)).shape == (3, 1)  # top_k 0: every token
    peaked = torch.full((2, 10), -10.0)
    peaked[:, 3] = 10.0
    assert runner.sample(peaked, sampling(2, 0.8), torch.zeros(2, 1)).tolist() == [[3], [3]]


def test_sampling_follows_the_distribution_and_its_limits():
    """Draws at 4000 positions of one row: frequencies within 3 sigma of softmax(logits / T); top_k and top_p keep
    exactly the tokens they name; a (seed, position) always draws the same token, whatever shares the batch."""
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    n = 4000
    positions = torch.arange(n)[:, None]

    def draws(**kw):
        return runner.sample(logits.expand(n, -1), sampling(n, seeds=[7] * n, **kw), positions)[:, 0]

    counts = torch.bincount(draws(), minlength=4).double()
    p = torch.tensor([0.5, 0.3, 0.15, 0.05], dtype=torch.float64)
    assert ((counts - n * p).abs() <= 3 * (n * p * (1 - p)).sqrt()).all(), counts
    assert set(draws(top_k=2).tolist()) == {0, 1}
    assert set(draws(top_p=0.7).tolist()) == {0, 1}  # 0.5 < 0.7: the second token is needed, the third is not
    sharp = torch.softmax(logits / 0.5, -1)[0].double()
    counts = torch.bincount(draws(temperature=0.5), minlength=4).double()
    assert ((counts - n * sharp).abs() <= 3 * (n * sharp * (1 - sharp)).sqrt()).all(), counts
    alone = runner.sample(logits, sampling(1, seeds=[7]), torch.tensor([[123]]))
    assert draws()[123] == alone[0, 0]


def test_cache_bytes_is_what_the_caches_allocate():
    model = tiny_model(ModelArgs(**{**TINY.to_dict(), "vocab_size": 256}))
    for strategy, options in [("full", {}), ("compress_kv", {"sink_size": 4, "window_size": 8}),
                              ("quantize_kv", {"sink_size": 4, "window_size": 8, "bits": "4", "group_size": 16})]:
        runner.setup_cache(model, strategy, options, batch_size=2, max_seq_length=64)
        assert memory.predicted_kv_bytes(model.args, strategy, options, 2, 64, torch.float32) == memory.allocated_kv_bytes(model)


def test_check_memory_suggests_the_largest_that_fits():
    model = tiny_model(ModelArgs(**{**TINY.to_dict(), "vocab_size": 256}))

    def needed(batch, length):
        return memory.predicted_generation_bytes(model.args, "full", {}, batch, length, 5, 10, torch.float32)

    available = needed(4, 1000)
    memory.check_memory(model, "full", {}, 4, 1000, 5, 10, available=available)  # fits exactly: no error
    with pytest.raises(ValueError) as error:
        memory.check_memory(model, "full", {}, 8, 1000, 5, 10, available=available)
    fit_length, fit_batch = map(int, re.search(r"--max_seq_length (\d+) or --batch_size (\d+) fits",
                                               str(error.value)).groups())
    assert needed(8, fit_length) <= available < needed(8, fit_length + 1)
    assert fit_batch == 4
    with pytest.raises(ValueError, match="even one sequence does not fit: lower --max_new_tokens"):
        memory.check_memory(model, "full", {}, 1, 1000, 5, 1000, available=needed(1, 999))  # 1000 tokens to hold


def test_compile_time_is_kept_out_of_the_decode_speed(monkeypatch, capsys, checkpoints):
    """--compile: the first decode calls (where compilation happens; here a 2 s stand-in) run before the timed
    generation, and the sampled tokens are those of the plain run (warm-up on reset caches, random state restored)."""
    calls = []

    def slow_first_call(model, token, input_pos, sampling):
        calls.append(int(input_pos.reshape(-1)[0]))  # positions (B, 1): every row at the same one here
        if len(calls) == 1:
            import time
            time.sleep(2.0)
        return runner.decode_one_token(model, token, input_pos, sampling)

    argv = ["--checkpoint_path", str(checkpoints["tiny"]), "--max_new_tokens", "5", "--temperature", "0.8",
            "--batch_size", "2"]
    generate.main(argv)
    plain = capsys.readouterr().out
    monkeypatch.setattr(generate, "compile_decode", lambda: slow_first_call)
    generate.main(argv + ["--compile"])
    compiled = capsys.readouterr().out
    assert calls == [0, 1, 2, 5, 6, 7, 8]  # 3 warm-up calls, then the 4 decode steps after the 5-token prompt
    compile_s = float(re.search(r"compile: ([\d.]+) s", compiled).group(1))
    decode_tps = float(re.search(r"decode: ([\d.]+) tokens/s", compiled).group(1))
    assert compile_s >= 2.0 and decode_tps > 8 / 2.0  # 4 steps x batch 2 in well under the 2 s stand-in
    text_of = lambda out: out.split("prompt tokens")[0].split("\n", 1)[1]  # noqa: E731
    assert text_of(compiled) == text_of(plain)


def test_read_prompt_escapes_and_bom(tmp_path):
    (tmp_path / "bom.txt").write_bytes("\ufeffhello".encode("utf-8"))
    assert cli_options.read_prompt(f"@{tmp_path / 'bom.txt'}") == "hello"
    assert cli_options.read_prompt("@@x") == "@x" and cli_options.read_prompt("plain") == "plain"


def test_prompts_file_runs_in_batches_and_writes_jsonl_in_input_order(checkpoints, tmp_path, capsys):
    """--prompts_file: prompts of different lengths (one with an escaped newline) run --batch_size at a time; every
    completion is the one its prompt gets alone (greedy), printed and written to --out in input order."""
    texts = ["Once upon a time,", "A list:\n1.", "Hi", "The capital of France is the city of"]
    (tmp_path / "prompts.txt").write_text("".join(t.replace("\n", "\\n") + "\n" for t in texts) + "\n",
                                          encoding="utf-8")
    common = ["--checkpoint_path", str(checkpoints["tiny"]), "--max_new_tokens", "6", "quantize_kv", "--bits", "4",
              "--sink_size", "2", "--window_size", "4", "--group_size", "4"]
    generate.main(["--prompts_file", str(tmp_path / "prompts.txt"), "--batch_size", "3",
                   "--out", str(tmp_path / "out.jsonl"), *common])
    printed = capsys.readouterr().out
    rows = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [r["index"] for r in rows] == [0, 1, 2, 3] and [r["prompt"] for r in rows] == texts
    assert printed.index("--- prompt 0") < printed.index("--- prompt 3")
    for text, row in zip(texts, rows):
        alone = tmp_path / "alone.jsonl"
        generate.main(["--prompt", text, "--out", str(alone), *common])
        capsys.readouterr()
        single = json.loads(alone.read_text())
        assert row["tokens"] == single["tokens"] and row["completion"] == single["completion"], text
        assert row["finish_reason"] in ("stop", "length")


def test_continuous_batching_on_the_command_line(checkpoints, tmp_path, capsys):
    """--prompts_file with --max_batch_size and --paged: every completion equals the one of the static batches
    (greedy), --out holds them in input order, and the report shows the pool and the continuous batch."""
    texts = ["Once upon a time,", "A list:\n1.", "Hi", "The capital of France is the city of", "Hi"]
    (tmp_path / "prompts.txt").write_text("".join(t.replace("\n", "\\n") + "\n" for t in texts), encoding="utf-8")
    common = ["--checkpoint_path", str(checkpoints["tiny"]), "--max_new_tokens", "6", "--prompts_file",
              str(tmp_path / "prompts.txt"), "--prefill_chunk_size", "3"]
    generate.main([*common, "--batch_size", "2", "--out", str(tmp_path / "static.jsonl")])
    capsys.readouterr()
    generate.main([*common, "--max_batch_size", "2", "--paged", "--block_size", "4", "--out",
                   str(tmp_path / "continuous.jsonl")])
    printed = capsys.readouterr().out
    static = [json.loads(line) for line in (tmp_path / "static.jsonl").read_text().splitlines()]
    continuous = [json.loads(line) for line in (tmp_path / "continuous.jsonl").read_text().splitlines()]
    assert [r["index"] for r in continuous] == list(range(len(texts)))
    assert [r["tokens"] for r in continuous] == [r["tokens"] for r in static]
    assert "KV pool:" in printed and "continuous batching: up to 2 sequences at once" in printed
