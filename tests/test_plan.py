"""generate.py --plan (plan.py) against real allocations, on the embedded SmolLM2-135M-Instruct, CPU: the plan's KV
bytes are what the caches set up on the loaded model allocate, its weight bytes what the loaded (and int8 / int4
quantized) model's parameters hold, counting the plain tensors inside torchao's, for one rank and for rank 0 of
three tensor-parallel ranks (tp.shard_model: the shard a torchrun rank loads). Nothing of the plan reads weights.
"""
import copy
import json
import re

import pytest
import torch

import checkpoint
import checkpoint
import cli_options
import memory
import runner
import generate
import kv_cache
import plan
import tp
import weight_quant

pytestmark = pytest.mark.usefixtures("one_thread")

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def base():
    return runner.load_model(checkpoint.default_checkpoint_path(), CPU, torch.float32)


def small_options(strategy):
    parser = cli_options.build_parser()
    options = cli_options.strategy_options(parser.parse_args([strategy]), parser)
    small = dict(sink_size=4, window_size=8, budget=16, group_size=16)
    return {k: small.get(k, v) for k, v in options.items()}


def rank0(model, world):
    """The model (world 1) or the shard rank 0 of `world` ranks holds, without caches."""
    for layer in model.layers:  # a cache set up by an earlier test is no weight (shard_model copies state_dict())
        layer.attention.kv_cache = None
    return model if world == 1 else tp.shard_model(model, 0, world)


KV_CASES = [(s, None, 1) for s in kv_cache.STRATEGIES] + [("full", 16, 1), ("quantize_kv", 16, 1), ("full", None, 3),
                                                            ("quantize_kv", None, 3), ("compress_kv", 16, 3)]


@pytest.mark.parametrize("strategy,block_size,world", KV_CASES,
                         ids=[f"{s}-{'paged' if b else 'contiguous'}-tp{w}" for s, b, w in KV_CASES])
def test_kv_bytes_are_the_real_cache(base, strategy, block_size, world):
    options = small_options(strategy)
    model = rank0(base, world)
    batch, length = 3, 100
    runner.setup_cache(model, strategy, options, batch, length, quiet=True, block_size=block_size)
    planned = plan.plan_bytes(base.args, strategy, options, batch, length, 10, length, torch.float32, "cpu", world,
                              block_size=block_size)
    assert planned["kv"] == memory.allocated_kv_bytes(model) > 0
    assert planned["local_args"].n_kv_head == base.args.n_kv_head // world


@pytest.mark.parametrize("mode,dtype,world", [(None, torch.float32, 1), ("int8", torch.float32, 1),
                                              ("int4", torch.bfloat16, 1), (None, torch.float32, 3),
                                              ("int8", torch.float32, 3), ("int4", torch.bfloat16, 3)])
def test_weight_bytes_are_the_real_parameters(base, mode, dtype, world):
    model = rank0(copy.deepcopy(base).to(dtype), world)
    weight_quant.quantize_weights(model, mode)
    planned = plan.weight_bytes(base.args, dtype, "cpu", world, mode=mode)
    assert planned["weights"] == weight_quant.model_bytes(model)
    linears = weight_quant.quantized_linears(model)
    assert planned["linears"] == sum(weight_quant.tensor_bytes(m.weight) for m in linears.values())
    if mode is not None:  # really torchao tensors, counted by their inner tensors
        assert all(type(m.weight) is not torch.nn.Parameter for m in linears.values())
        # int8: 1 byte a weight against float32's 4; int4 in groups of 32: 0.5 + 4/32 bytes against bfloat16's 2.
        assert planned["linears"] < 0.32 * sum(m.weight.numel() for m in linears.values()) * dtype.itemsize


def run_plan(argv, capsys, monkeypatch):
    """generate.main(--plan ...): its stdout; any weight read fails the test."""
    def no_weights(*args, **kwargs):
        raise AssertionError("--plan read weights")
    monkeypatch.setattr(generate, "load_model", no_weights)
    monkeypatch.setattr(checkpoint, "load_checkpoint", no_weights)
    monkeypatch.setattr(torch, "load", no_weights)
    generate.main(["--plan", *argv])
    return capsys.readouterr().out


def test_plan_prints_the_counts_and_the_largest_batch_the_run_accepts(base, capsys, monkeypatch):
    budget_gb, length = 0.5, 1000
    out = run_plan(["--memory_gb", str(budget_gb), "--quantize", "int8", "--batch_size", "4", "--max_seq_length",
                    str(length), "quantize_kv", "--bits", "4"], capsys, monkeypatch)
    parser = cli_options.build_parser()
    options = cli_options.strategy_options(parser.parse_args(["quantize_kv", "--bits", "4"]), parser)
    prompt_len = int(re.search(r"prefill logits of (\d+) tokens", out).group(1))
    assert prompt_len == 5  # "Once upon a time," after BOS, as run() counts it
    planned = plan.plan_bytes(base.args, "quantize_kv", options, 4, length, prompt_len, length, torch.float32, "cpu",
                              mode="int8")
    for label in ("weights", "kv", "total"):
        shown = {"kv": "KV cache"}.get(label, label)
        assert re.search(rf"{shown}\s+{re.escape(memory.format_bytes(planned[label]))}", out), (label, out)
    assert "fits" in out and "does NOT" not in out
    best = int(re.search(r"largest batch at 1000 tokens: (\d+)", out).group(1))
    # The run's own memory check (memory.check_memory) on the int8 model, left the budget minus its weights:
    model = weight_quant.quantize_weights(copy.deepcopy(base), "int8")
    available = int(budget_gb * 2**30) - weight_quant.model_bytes(model)
    memory.check_memory(model, "quantize_kv", options, best, length, prompt_len, length, available)
    with pytest.raises(ValueError, match="--batch_size"):
        memory.check_memory(model, "quantize_kv", options, best + 1, length, prompt_len, length, available)


def test_plan_from_a_config_alone(base, tmp_path, capsys, monkeypatch):
    """A Hugging Face config.json with no weights and no tokenizer beside it (planning a model not downloaded)."""
    a = base.args
    config = dict(model_type="llama", vocab_size=a.vocab_size, hidden_size=a.dim, num_hidden_layers=a.n_layer,
                  num_attention_heads=a.n_head, num_key_value_heads=a.n_kv_head, intermediate_size=a.intermediate_size,
                  head_dim=a.head_dim, rms_norm_eps=a.norm_eps, rope_theta=a.rope_base,
                  max_position_embeddings=a.max_position_embeddings, tie_word_embeddings=a.tie_word_embeddings)
    (tmp_path / "config.json").write_text(json.dumps(config))
    out = run_plan(["--checkpoint_path", str(tmp_path / "config.json"), "--device", "cuda", "--memory_gb", "1",
                    "--tp", "3", "--quantize", "int4", "--max_seq_length", "4096"], capsys, monkeypatch)
    planned = plan.weight_bytes(a, torch.bfloat16, "cuda", 3, mode="int4")
    assert "3 tensor-parallel rank(s) (3 query / 1 KV heads, 512 MLP channels each), cuda bfloat16" in out
    assert f"weights   {memory.format_bytes(planned['weights']):>11}" in out
    with pytest.raises(SystemExit, match="no tokenizer beside .* give --max_seq_length"):
        run_plan(["--checkpoint_path", str(tmp_path), "--memory_gb", "1"], capsys, monkeypatch)


def test_int4_on_cuda_counts_torchao_padding(base):
    """The CUDA layout (Int4TilePackedTo4dTensor, not buildable without a GPU): rows padded to 8, columns to 1024."""
    assert weight_quant.linear_bytes(1536, 576, "int4", 32, torch.bfloat16, "cuda") == \
        1536 * 1024 // 2 + (1024 // 32) * 1536 * 2 * 2
    assert weight_quant.linear_bytes(1536, 576, "int4", 32, torch.float32, "cpu") == \
        1536 * 576 // 2 + (576 // 32) * 1536 * 2 * 4


@pytest.mark.parametrize("argv,message", [
    (["--tp", "2", "--memory_gb", "1"], r"9 query heads do not split evenly over 2 ranks: use 3 ranks"),
    (["--tp", "6", "--memory_gb", "1"], r"6 ranks but the model has 3 KV heads"),
    (["--memory_gb", "0.1"], r"the weights alone need 513.1 MiB per GPU but 102.4 MiB is given: use --quantize"),
    (["--quantize", "int8", "--memory_gb", "0.5", "--max_seq_length", "8192"],
     r"not even one sequence of 8192 tokens fits.*--max_seq_length \d+ fits at batch 1"),
    (["--quantize", "int4", "--device", "cuda", "--dtype", "float32", "--memory_gb", "1"], r"bfloat16 only"),
    (["--quantize", "int7"], r"invalid choice: 'int7'"),
    (["--device", "cuda"], r"give --memory_gb"),
])
def test_bad_plans_are_one_line(argv, message, capsys, monkeypatch):
    with pytest.raises(SystemExit) as exit_info:
        run_plan(argv, capsys, monkeypatch)
    text = str(exit_info.value.code) + capsys.readouterr().err
    assert text.startswith("error: ") and "\n" not in text.strip() and re.search(message, text), text


def test_plan_flags_need_plan(capsys):
    for argv in (["--tp", "3"], ["--memory_gb", "2"]):
        with pytest.raises(SystemExit, match="is for --plan"):
            generate.main(argv)
