"""scripts/evaluate.py and scripts/run_matrix.py end to end on a tiny slice, with the real embedded model.

The reference for streaming perplexity is the model's own one-shot full-sequence perplexity (tests/test_model.py
pins the model to transformers): the full cache streamed token by token must give it, and so must any strategy that
compresses nothing (sink + window >= tokens), while one that does compress must not.
"""
import json
import math
import random
import re

import pytest
import torch
import torch.nn.functional as F

from checkpoint import default_checkpoint_path
from engine import generate_batch
from runner import sample, setup_cache
from scripts import evaluate, run_matrix
from scripts.data import corpus
from scripts.prepare_checkpoint import smollm2_gguf_path

TOKENS = 32


def checkpoint_path():
    """The prepared model.pth when setup has run, else the GGUF it is made from (same weights)."""
    path = default_checkpoint_path()
    return path if path.exists() else smollm2_gguf_path()


@pytest.fixture(scope="module")
def model_and_tokenizer():
    args, _ = evaluate.parse(["--checkpoint_path", str(checkpoint_path()), "--device", "cpu", "--dtype", "float32"])
    model, tokenizer, _ = evaluate.load(args)
    return model, tokenizer


@pytest.fixture(scope="module")
def stream_ids(model_and_tokenizer):
    _, tokenizer = model_and_tokenizer
    return torch.tensor(evaluate.encode(tokenizer, corpus.stream_text()[:2000])[:TOKENS + 1])


def streamed_nll(model, ids, strategy, options, step="prefill", prompt=0):
    setup_cache(model, strategy, options, 1, TOKENS)
    with torch.inference_mode():
        return evaluate.stream_nll(model, ids, chunk_size=1, step=step, prompt=prompt)


@pytest.fixture(scope="module")
def full_nll(model_and_tokenizer, stream_ids):
    return streamed_nll(model_and_tokenizer[0], stream_ids, "full", {})


def test_full_cache_streaming_equals_one_shot_perplexity(model_and_tokenizer, stream_ids, full_nll):
    model, _ = model_and_tokenizer
    setup_cache(model, "full", {}, 1, TOKENS)
    with torch.inference_mode():
        logits = model(stream_ids[None, :-1], torch.arange(TOKENS))
    one_shot = F.cross_entropy(logits[0].float(), stream_ids[1:], reduction="none")
    torch.testing.assert_close(full_nll, one_shot, rtol=0, atol=1e-4)
    assert math.exp(full_nll.mean()) == pytest.approx(math.exp(one_shot.mean()), rel=1e-5)
    assert 2 < math.exp(one_shot.mean()) < 200  # an English essay under a working model


@pytest.mark.parametrize("strategy, options", [
    ("compress_kv", {"sink_size": 8, "window_size": TOKENS}),
    ("quantize_kv", {"sink_size": 8, "window_size": TOKENS, "bits": "2"}),
])
def test_strategy_that_compresses_nothing_streams_like_full(model_and_tokenizer, stream_ids, full_nll, strategy,
                                                            options):
    model, _ = model_and_tokenizer
    torch.testing.assert_close(streamed_nll(model, stream_ids, strategy, options), full_nll, rtol=0, atol=1e-4)


@pytest.mark.parametrize("strategy, options", [
    ("compress_kv", {"sink_size": 4, "window_size": 8}),
    ("quantize_kv", {"sink_size": 4, "window_size": 8, "bits": "2", "group_size": 8}),  # keys flushed 8 at a time
])
def test_compressing_strategy_is_scored_through_its_cache(model_and_tokenizer, stream_ids, full_nll, strategy,
                                                          options):
    """Token-by-token streaming reads the evicted/quantized cache: later tokens' NLL moves; the first 12 cannot."""
    model, _ = model_and_tokenizer
    compressed = streamed_nll(model, stream_ids, strategy, options)
    torch.testing.assert_close(compressed[:12], full_nll[:12], rtol=0, atol=1e-4)
    assert (compressed[12:] - full_nll[12:]).abs().max() > 1e-2


def test_full_cache_streamed_through_the_decode_step_equals_one_shot(model_and_tokenizer, stream_ids, full_nll):
    model, _ = model_and_tokenizer
    torch.testing.assert_close(streamed_nll(model, stream_ids, "full", {}, step="decode"), full_nll, rtol=0, atol=1e-4)


@pytest.mark.parametrize("strategy, options, prompt", [
    ("tova", {"sink_size": 4, "window_size": 8, "budget": 20, "then_bits": "4", "group_size": 8}, 1),
    ("snapkv", {"sink_size": 4, "window_size": 8, "budget": 16, "then_bits": "4", "group_size": 8}, 20),
])
def test_decode_streaming_scores_what_generation_sees(model_and_tokenizer, stream_ids, strategy, options, prompt):
    """--stream_step decode (with --stream_prompt) feeds a text as generation does: the prompt in one prefill, then
    one decode step a token. On eviction caches that evict (tova keeps 20 of 32 tokens, int4; snapkv compresses a
    20-token prompt to 16 and drops what decoding adds), the NLL of the cache's own greedy continuation equals
    what the logits of generate_batch's decode steps give, token for token."""
    model, _ = model_and_tokenizer
    logits = []

    def recording_step(model, token, input_pos, sampling=None):
        out = model(token, input_pos)
        logits.append(out[:, -1].float())
        return sample(out[:, -1], sampling, input_pos)

    setup_cache(model, strategy, options, 1, TOKENS)
    with torch.inference_mode():
        made = generate_batch(model, [stream_ids[:prompt].tolist()], TOKENS - prompt, decode_fn=recording_step)
    text = torch.tensor(stream_ids[:prompt].tolist() + made["sequences"][0]["tokens"])
    assert text.numel() == TOKENS and len(logits) == TOKENS - 1 - prompt  # the first new token: the prompt's
    generated = F.cross_entropy(torch.cat(logits), text[prompt + 1:], reduction="none")
    decoded = streamed_nll(model, text, strategy, options, step="decode", prompt=prompt)
    torch.testing.assert_close(decoded[prompt:], generated, rtol=0, atol=1e-4)


def test_one_token_prefill_chunks_are_not_decode_steps(model_and_tokenizer, stream_ids, full_nll):
    """A one-token prefill chunk has tova choose again what it keeps from its pooled scores, the decode step moves
    the token leaving the window into its store: the same until the budget is full, then not."""
    model, _ = model_and_tokenizer
    options = {"sink_size": 4, "window_size": 8, "budget": 20, "then_bits": "4", "group_size": 8}
    chunked = streamed_nll(model, stream_ids, "tova", options)
    decoded = streamed_nll(model, stream_ids, "tova", options, step="decode")
    torch.testing.assert_close(chunked[:12], decoded[:12], rtol=0, atol=1e-4)  # nothing quantized or evicted yet
    torch.testing.assert_close(decoded[:12], full_nll[:12], rtol=0, atol=1e-4)
    assert (chunked[12:] - decoded[12:]).abs().max() > 1e-3


def test_stream_options_are_recorded_and_change_a_results_settings(tmp_path):
    """A decode-step or prompt stream is another result (run_matrix computes it again); left at their defaults the
    settings are those of a result made before the options existed."""
    def settings(extra):
        args, options = evaluate.parse(["full", "--checkpoint_path", str(checkpoint_path())] + extra)
        return evaluate.run_settings(args, options)
    default = settings([])
    assert "stream_step" not in default and "stream_prompt" not in default
    decode = settings(["--stream_step", "decode"])
    prompted = settings(["--stream_prompt", "8"])
    assert decode["stream_step"] == "decode" and prompted["stream_prompt"] == 8
    path = tmp_path / "r.json"
    path.write_text(json.dumps({"strategy": "full", "seconds": 1, "settings": default}))
    assert run_matrix.finished(path, default) == "complete"
    assert run_matrix.finished(path, decode) == "stale" and run_matrix.finished(path, prompted) == "stale"
    assert evaluate.streamed({"chunk_size": 1}) == "chunk 1"
    assert evaluate.streamed({"chunk_size": 1, "stream_step": "decode", "stream_prompt": 512}) == \
        "after a prompt of 512 tokens, chunk 1, decode"


def tiny_argv(out_json, strategy_argv):
    return strategy_argv + [
        "--checkpoint_path", str(checkpoint_path()), "--device", "cpu", "--dtype", "float32",
        "--max_tokens", "16", "--stream_tokens", "32", "--max_position", "96",
        "--rouge_prompts", "2", "--prompt_tokens", "20", "--new_tokens", "6", "--prefill_chunk", "8",
        "--retrieval_tasks", "passkey", "--retrieval_lengths", "80", "--retrieval_depths", "0.5",
        "--json", str(out_json)]


def test_evaluate_and_render_end_to_end(model_and_tokenizer, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(evaluate, "OUTPUTS", tmp_path)  # the full cache's ROUGE-L reference is cached there
    monkeypatch.setattr(evaluate, "load", lambda args: (*model_and_tokenizer, checkpoint_path()))  # loaded once
    runs = {"full": ["full"],
            "nothing": ["quantize_kv", "--sink_size", "4", "--window_size", "200", "--bits", "4"],
            "compress": ["compress_kv", "--sink_size", "4", "--window_size", "8"]}
    results = {}
    for name, strategy_argv in runs.items():
        evaluate.main(tiny_argv(tmp_path / "matrix" / f"{name}.json", strategy_argv))
        results[name] = json.loads((tmp_path / "matrix" / f"{name}.json").read_text())
    summary_lines = capsys.readouterr().out.strip().splitlines()
    assert len(summary_lines) == 3 and re.match(r"full( \S+=\S+)*: perplexity \d+\.\d{3} \(16 tokens", summary_lines[0])

    for r in results.values():
        for key in ("strategy", "options", "perplexity", "tokens", "rouge_l", "rouge_l_vs_full",
                    "retrieval_accuracy", "tokens_per_s", "kv_bytes", "chunk_size", "stream_step"):
            assert key in r and r[key] is not None, key
        assert r["tokens"] == 16 and r["chunk_size"] == 1
        assert [s["task"] for s in r["retrieval_samples"]] == ["passkey"]
    full, nothing, compress = results["full"], results["nothing"], results["compress"]
    assert nothing["perplexity"] == pytest.approx(full["perplexity"], rel=1e-5)
    assert full["rouge_l_vs_full"] == 1.0 and nothing["rouge_l_vs_full"] == 1.0  # same greedy tokens
    assert [c["output"] for c in nothing["continuations"]] == [c["full"] for c in nothing["continuations"]]
    # The 32-token stream fits --max_position 96: every cache runs all of it.
    assert compress["nll_by_position"]["tokens"] == 32 and full["nll_by_position"]["tokens"] == 32
    assert compress["kv_bytes"] < full["kv_bytes"] == full["kv_bytes_full"]
    assert compress["kv_ratio"] == pytest.approx(12 / 16, rel=0.01)  # 4 + 8 slots for 16 tokens (+ their positions)

    table = run_matrix.render(tmp_path / "matrix")
    rows = [line for line in table.splitlines() if line.startswith("| ")][1:]
    assert len(rows) == 3
    full_row = next(row for row in rows if row.startswith("| full |"))
    assert f"| {full['perplexity']:.2f} |" in full_row and "| 1.000 |" in full_row
    compress_row = next(row for row in rows if row.startswith("| compress_kv"))
    assert f"| {compress['kv_ratio']:.3f} |" in compress_row
    # The model's whole context: compress_kv's 12 slots against full's (sizes from each run's own memory curve).
    long_tokens, compress_long = compress["kv_bytes_by_tokens"][-1]
    assert f"| {compress_long / dict(full['kv_bytes_by_tokens'])[long_tokens]:.3f} |" in compress_row
    for name in ("kv_memory.png", "perplexity_vs_position.png", "retrieval_vs_length.png"):
        assert (tmp_path / "matrix" / name).stat().st_size > 10_000


def test_stream_of_fixed_capacity_cache_stops_at_max_position(model_and_tokenizer, tmp_path):
    model, tokenizer = model_and_tokenizer
    args, options = evaluate.parse(tiny_argv(tmp_path / "r.json", ["full"]) + [
        "--max_position", "24", "--rouge_prompts", "0", "--retrieval_lengths", ""])
    result = evaluate.evaluate(model, tokenizer, "full", options, args, checkpoint_path())
    assert result["nll_by_position"]["tokens"] == 24 and result["rouge_l"] is None
    args.max_tokens = 30
    with pytest.raises(ValueError, match="--max_tokens 30 needs 30 tokens but a full cache holds 24"):
        evaluate.evaluate(model, tokenizer, "full", options, args, checkpoint_path())


def test_perplexity_after_a_prompt_scores_the_tokens_after_it(model_and_tokenizer, tmp_path):
    """--stream_prompt 8 --max_tokens 16: the full cache's perplexity over the 8 tokens after the prompt, which is
    the one-shot forward's over them (the decode step streams the rest)."""
    model, tokenizer = model_and_tokenizer
    args, options = evaluate.parse(tiny_argv(tmp_path / "r.json", ["full"]) + [
        "--stream_tokens", "0", "--stream_prompt", "8", "--stream_step", "decode", "--rouge_prompts", "0",
        "--retrieval_lengths", ""])
    result = evaluate.evaluate(model, tokenizer, "full", options, args, checkpoint_path())
    ids = torch.tensor(evaluate.prepare(tokenizer, args)["stream_ids"])
    setup_cache(model, "full", {}, 1, TOKENS)
    with torch.inference_mode():
        logits = model(ids[None, :-1], torch.arange(16))
    one_shot = F.cross_entropy(logits[0].float(), ids[1:], reduction="none")
    assert result["tokens"] == 8 and result["stream_prompt"] == 8 and result["stream_step"] == "decode"
    assert result["perplexity"] == pytest.approx(math.exp(one_shot[8:].mean()), rel=1e-5)
    assert abs(math.exp(one_shot.mean()) / result["perplexity"] - 1) > 1e-3  # the prompt's tokens are not scored
    assert "after a prompt of 8 tokens, chunk 1, decode" in evaluate.summary(result)


def test_bad_settings_are_one_line_errors(capsys):
    with pytest.raises(SystemExit, match="--chunk_size must be at least 1"):
        evaluate.main(["--chunk_size", "0"])
    with pytest.raises(SystemExit, match="--stream_step decode feeds one token a step: use --chunk_size 1"):
        evaluate.main(["--stream_step", "decode", "--chunk_size", "4"])
    with pytest.raises(SystemExit, match="--stream_prompt 256 leaves no token to score of --max_tokens 256"):
        evaluate.main(["--stream_prompt", "256"])
    with pytest.raises(SystemExit, match="unknown retrieval task nope"):
        evaluate.main(["--retrieval_tasks", "passkey,nope"])


def test_retrieval_prompts_hold_the_answer_at_the_asked_depth(model_and_tokenizer):
    _, tokenizer = model_and_tokenizer
    for task, sample_fn in corpus.RETRIEVAL_TASKS.items():
        for depth in (0.0, 0.5, 1.0):
            sample = sample_fn(tokenizer.encode, 1024, depth, random.Random(f"{task}-{depth}"))
            tokens = len(sample["ids"])
            assert 900 < tokens <= 1024, (task, tokens)
            assert tokens == 1024, (task, tokens)  # exactly the length asked for
            prompt = tokenizer.decode(sample["ids"])
            where = prompt.index(sample["answers"][0]) / len(prompt) if task == "passkey" else None
            if where is not None:
                assert abs(where - depth) < 0.15, (depth, where)
    assert corpus.is_correct(" 89811. The pass key", ["89811"])
    assert corpus.is_correct("The answer is the Normans.", ["Normans"])
    assert not corpus.is_correct("France", ["Normandy"])
