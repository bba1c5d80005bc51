"""model.py + checkpoint.py against transformers' LlamaForCausalLM (CPU, float32).

The real SmolLM2-135M GGUF is loaded once per module by both sides; small random Llama-2/3/3.1/tied checkpoints
go through the HF -> model.pth converter and through tiny GGUF files written here the way llama.cpp writes them.
"""
import copy
import importlib.util
import math
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import tokenizers
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from checkpoint import load_checkpoint, write_checkpoint
from kv_cache.full import FullCache
from model import Transformer
from tokenizer import load_tokenizer

REPO_DIR = Path(__file__).resolve().parent.parent


def import_script(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO_DIR / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


convert_hf_checkpoint = import_script("convert_hf_checkpoint")
prepare_checkpoint = import_script("prepare_checkpoint")

PROMPTS = ["The capital of France is", "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n"]
CHAT_PROMPT = "<|im_start|>user\nWhat is the tallest mountain in the world?<|im_end|>\n<|im_start|>assistant\n"


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours.double() - ref.double()).norm() / ref.double().norm()).item()


def with_caches(model: Transformer, batch_size: int, max_seq_length: int) -> Transformer:
    args = model.args
    model.setup_caches(lambda i: FullCache(batch_size, max_seq_length, args.n_kv_head, args.head_dim,
                                           torch.float32, "cpu"), max_seq_length)
    return model


def forward(model: Transformer, ids: torch.Tensor, start: int = 0) -> torch.Tensor:
    with torch.no_grad():
        return model(ids, torch.arange(start, start + ids.shape[1]))


# ---- the embedded SmolLM2-135M GGUF ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def smollm2(smollm2_model):
    return smollm2_model


@pytest.fixture(scope="module")
def smollm2_reference(smollm2_gguf_path, smollm2_transformers):
    kwargs = dict(pretrained_model_name_or_path=smollm2_gguf_path.parent, gguf_file=smollm2_gguf_path.name)
    return smollm2_transformers, AutoTokenizer.from_pretrained(**kwargs)


def test_smollm2_gguf_args(smollm2):
    a = smollm2.args
    assert (a.n_layer, a.dim, a.n_head, a.n_kv_head, a.head_dim, a.intermediate_size, a.vocab_size) == \
        (30, 576, 9, 3, 64, 1536, 49152)
    assert a.tie_word_embeddings and smollm2.output is None
    assert (a.rope_base, a.max_position_embeddings, a.rope_scaling) == (100000.0, 8192, None)
    assert a.norm_eps == pytest.approx(1e-5)


def test_smollm2_logits_match_transformers(smollm2, smollm2_reference):
    reference, hf_tokenizer = smollm2_reference
    for prompt in PROMPTS:
        ids = torch.tensor([hf_tokenizer.encode(prompt)])
        with torch.no_grad():
            ref = reference(ids).logits
        ours = forward(with_caches(smollm2, 1, ids.shape[1]), ids)
        assert rel_err(ours, ref) <= 1e-4, prompt


def test_smollm2_greedy_decode_matches_transformers(smollm2, smollm2_reference):
    """32 greedy tokens: transformers with its own KV cache, ours prefilling then decoding one token a step
    through FullCache. Every step's logits must agree too, not only the argmax."""
    reference, hf_tokenizer = smollm2_reference
    n_new = 32
    ids = torch.tensor([hf_tokenizer.encode(CHAT_PROMPT)])
    T = ids.shape[1]
    with torch.no_grad():
        out = reference(ids, use_cache=True)
        ref_logits = [out.logits[0, -1]]
        for _ in range(n_new - 1):  # no stop at EOS: the comparison runs all 32 steps
            token = ref_logits[-1].argmax().view(1, 1)
            out = reference(token, past_key_values=out.past_key_values, use_cache=True)
            ref_logits.append(out.logits[0, -1])
    with_caches(smollm2, 1, T + n_new)
    logits = [forward(smollm2, ids)[0, -1]]
    for pos in range(T, T + n_new - 1):
        logits.append(forward(smollm2, logits[-1].argmax().view(1, 1), pos)[0, -1])
    ref_tokens = [x.argmax().item() for x in ref_logits]
    assert [x.argmax().item() for x in logits] == ref_tokens, hf_tokenizer.decode(ref_tokens)
    assert max(rel_err(x, r) for x, r in zip(logits, ref_logits)) <= 1e-4


def test_prefill_then_decode_equals_one_forward(smollm2):
    torch.manual_seed(0)
    ids = torch.randint(0, smollm2.args.vocab_size, (1, 10))
    full = forward(with_caches(smollm2, 1, 10), ids)
    with_caches(smollm2, 1, 10)
    steps = [forward(smollm2, ids[:, :6])]
    steps += [forward(smollm2, ids[:, pos:pos + 1], pos) for pos in range(6, 10)]
    assert rel_err(torch.cat(steps, dim=1), full) <= 1e-5


def test_batch_of_two_equals_two_runs_of_one(smollm2):
    torch.manual_seed(1)
    ids = torch.randint(0, smollm2.args.vocab_size, (2, 6))
    nxt = torch.randint(0, smollm2.args.vocab_size, (2, 1))
    with_caches(smollm2, 2, 8)
    batched = torch.cat([forward(smollm2, ids), forward(smollm2, nxt, 6)], dim=1)
    for b in range(2):
        with_caches(smollm2, 1, 8)
        single = torch.cat([forward(smollm2, ids[b:b + 1]), forward(smollm2, nxt[b:b + 1], 6)], dim=1)
        assert rel_err(batched[b:b + 1], single) <= 1e-5


# ---- small random Hugging Face checkpoints ------------------------------------------------------------------

SMALL = dict(vocab_size=256, hidden_size=64, num_hidden_layers=2, intermediate_size=96, initializer_range=0.1,
             max_position_embeddings=2048)
LLAMA31_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                # A short original context puts this small head_dim's frequencies in all three llama3 bands.
                "original_max_position_embeddings": 64}
CONFIGS = {
    "llama2": dict(num_attention_heads=4, num_key_value_heads=4, rope_theta=10000.0, rms_norm_eps=1e-5),
    "llama3": dict(num_attention_heads=4, num_key_value_heads=2, rope_theta=500000.0, rms_norm_eps=1e-5),
    "llama31": dict(num_attention_heads=4, num_key_value_heads=2, rope_theta=500000.0, rms_norm_eps=1e-5,
                    rope_scaling=LLAMA31_ROPE),
    "tied": dict(num_attention_heads=4, num_key_value_heads=1, head_dim=32, rope_theta=100000.0,
                 tie_word_embeddings=True),
}


def make_hf_checkpoint(name: str, out_dir: Path) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(**SMALL, **copy.deepcopy(CONFIGS[name]))  # transformers edits rope dicts in place
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(out_dir, max_shard_size="100KB")
    if name == "llama31":  # a Hub Llama-3.1 config.json: top-level rope_theta and rope_scaling (transformers < 5)
        import json
        cfg = json.loads((out_dir / "config.json").read_text())
        rope = cfg.pop("rope_parameters")
        cfg["rope_theta"] = rope.pop("rope_theta")
        cfg["rope_scaling"] = rope
        (out_dir / "config.json").write_text(json.dumps(cfg))
    return model


@pytest.mark.parametrize("name", list(CONFIGS))
def test_converted_hf_checkpoint_matches_transformers(name, tmp_path):
    hf_dir, out_dir = tmp_path / "hf", tmp_path / "out"
    reference = make_hf_checkpoint(name, hf_dir)
    assert (hf_dir / "model.safetensors.index.json").exists()  # sharded
    (hf_dir / "tokenizer.json").write_text('{"stand-in": "tokenizer.json"}')
    (hf_dir / "original").mkdir()
    (hf_dir / "original" / "tokenizer.model").write_bytes(b"stand-in tiktoken file")

    convert_hf_checkpoint.main(["--checkpoint_dir", str(hf_dir), "--out_dir", str(out_dir)])
    assert (out_dir / "tokenizer.model").read_bytes() == b"stand-in tiktoken file"
    assert (out_dir / "tokenizer.json").read_text() == (hf_dir / "tokenizer.json").read_text()

    torch.manual_seed(2)
    ids = torch.randint(0, SMALL["vocab_size"], (2, 80))
    with torch.no_grad():
        ref = reference(ids).logits
    for path in (out_dir / "model.pth", hf_dir):
        args, state_dict = load_checkpoint(path)
        model = with_caches(Transformer.from_state_dict(args, state_dict), 2, ids.shape[1])
        assert rel_err(forward(model, ids), ref) <= 1e-5, path
    assert (model.output is None) == (name == "tied")
    if name == "llama31":  # the scaling must matter here, or this test could not catch it being dropped
        args.rope_scaling = None
        model = with_caches(Transformer.from_state_dict(args, state_dict), 2, ids.shape[1])
        assert rel_err(forward(model, ids), ref) > 1e-3


def test_convert_refuses_to_overwrite(tmp_path):
    make_hf_checkpoint("llama2", tmp_path / "hf")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "model.pth").write_bytes(b"a user's file")
    cmd = [sys.executable, "scripts/convert_hf_checkpoint.py", "--checkpoint_dir", str(tmp_path / "hf"),
           "--out_dir", str(tmp_path / "out")]
    result = subprocess.run(cmd, cwd=REPO_DIR, capture_output=True, text=True)
    assert result.returncode != 0 and "--force" in result.stderr and "Traceback" not in result.stderr
    assert (tmp_path / "out" / "model.pth").read_bytes() == b"a user's file"
    assert subprocess.run(cmd + ["--force"], cwd=REPO_DIR, capture_output=True).returncode == 0
    load_checkpoint(tmp_path / "out" / "model.pth")


# ---- tiny GGUF files, written the way llama.cpp's convert_hf_to_gguf.py writes them -------------------------

def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's LlamaModel.permute: q/k rows interleaved for its pairwise RoPE."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def llama_cpp_rope_freqs(config: LlamaConfig, head_dim: int) -> np.ndarray:
    """llama.cpp's Llama-3.1 rope_freqs tensor (LlamaModel.generate_extra_tensors), original context 8192."""
    factor, old_context = config.rope_parameters["factor"], 8192
    freqs = 1.0 / config.rope_parameters["rope_theta"] ** (np.arange(0, head_dim, 2) / head_dim)
    out = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < old_context / 4:
            out.append(1.0)
        elif wavelen > old_context:
            out.append(factor)
        else:
            smooth = (old_context / wavelen - 1) / 3
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


def write_gguf(path: Path, model: LlamaForCausalLM, qtype=gguf.GGMLQuantizationType.F32, rope_freqs=None,
               with_tokenizer=False):
    c = model.config
    writer = gguf.GGUFWriter(path, "llama")
    if with_tokenizer:  # a byte-level BPE vocabulary: the 256 byte symbols but one, and one merge
        writer.add_tokenizer_model("gpt2")
        writer.add_token_list(sorted(tokenizers.pre_tokenizers.ByteLevel.alphabet())[:255] + ["he"])
        writer.add_token_merges(["h e"])
        writer.add_bos_token_id(0)
        writer.add_eos_token_id(1)
    writer.add_block_count(c.num_hidden_layers)
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_head_count(c.num_attention_heads)
    writer.add_head_count_kv(c.num_key_value_heads)
    writer.add_rope_freq_base(c.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(c.rms_norm_eps)
    writer.add_rope_dimension_count(c.head_dim)
    writer.add_key_length(c.head_dim)
    writer.add_value_length(c.head_dim)
    names = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output",
             "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
             "model.layers.": "blk."}
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and c.tie_word_embeddings:
            continue  # llama.cpp writes no output.weight for tied checkpoints
        w = tensor.numpy()
        if "q_proj" in name:
            w = llama_cpp_permute(w, c.num_attention_heads)
        if "k_proj" in name:
            w = llama_cpp_permute(w, c.num_key_value_heads)
        for hf, ours in names.items():
            name = name.replace(hf, ours)
        if w.ndim == 1:
            writer.add_tensor(name, w)
        else:
            writer.add_tensor(name, gguf.quants.quantize(w, qtype), raw_dtype=qtype)
    if rope_freqs is not None:
        writer.add_tensor("rope_freqs.weight", rope_freqs)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.mark.parametrize("name", ["llama2", "llama3", "tied"])
def test_gguf_layout_matches_hf(name, tmp_path):
    """An F32 GGUF loads to exactly the HF checkpoint's weights: names, Q/K un-permutation, args."""
    reference = make_hf_checkpoint(name, tmp_path / "hf")
    write_gguf(tmp_path / "tiny.gguf", reference)
    args, state_dict = load_checkpoint(tmp_path / "tiny.gguf")
    hf_args, hf_state_dict = load_checkpoint(tmp_path / "hf")
    assert args.to_dict() == {**hf_args.to_dict(), "norm_eps": args.norm_eps}  # eps is a float32 in GGUF
    assert args.norm_eps == pytest.approx(hf_args.norm_eps)
    assert state_dict.keys() == hf_state_dict.keys()
    for key in state_dict:
        assert torch.equal(state_dict[key], hf_state_dict[key]), key


def test_gguf_llama31_rope_freqs(tmp_path):
    """llama.cpp stores Llama-3.1 rope scaling as a rope_freqs tensor; it comes back as HF's llama3 parameters."""
    torch.manual_seed(0)
    rope_scaling = {**LLAMA31_ROPE, "original_max_position_embeddings": 8192}
    config = LlamaConfig(**{**SMALL, **CONFIGS["llama31"], "max_position_embeddings": 131072,
                            "rope_scaling": dict(rope_scaling)})
    reference = LlamaForCausalLM(config).eval()
    head_dim = config.hidden_size // config.num_attention_heads
    freqs = llama_cpp_rope_freqs(config, head_dim)
    assert 1.0 in freqs and 8.0 in freqs and ((freqs > 1) & (freqs < 8)).any()  # all three bands present
    write_gguf(tmp_path / "tiny.gguf", reference, rope_freqs=freqs)
    args, state_dict = load_checkpoint(tmp_path / "tiny.gguf")
    assert args.rope_scaling == rope_scaling
    ids = torch.randint(0, SMALL["vocab_size"], (1, 40))
    with torch.no_grad():
        ref = reference(ids).logits
    assert rel_err(forward(with_caches(Transformer.from_state_dict(args, state_dict), 1, 40), ids), ref) <= 1e-5

    write_gguf(tmp_path / "odd.gguf", reference, rope_freqs=freqs * 1.5)
    with pytest.raises(ValueError, match="rope_freqs"):
        load_checkpoint(tmp_path / "odd.gguf")


@pytest.mark.parametrize("qtype, tolerance", [("F16", 1e-3), ("BF16", 1e-2), ("Q8_0", 1e-2), ("Q4_0", 0.2),
                                              ("Q4_1", 0.2)])
def test_gguf_quantized_types_load(qtype, tolerance, tmp_path):
    reference = make_hf_checkpoint("llama3", tmp_path / "hf")
    write_gguf(tmp_path / "tiny.gguf", reference, gguf.GGMLQuantizationType[qtype])
    _, state_dict = load_checkpoint(tmp_path / "tiny.gguf")
    _, hf_state_dict = load_checkpoint(tmp_path / "hf")
    for key in state_dict:
        assert state_dict[key].dtype == torch.float32
        assert 0 < rel_err(state_dict[key], hf_state_dict[key]) <= tolerance or state_dict[key].ndim == 1, key


def test_prepare_checkpoint_writes_once(tmp_path, monkeypatch, capsys):
    """scripts/prepare_checkpoint.py, run on a tiny GGUF in place of the embedded SmolLM2 one."""
    write_gguf(tmp_path / "tiny.gguf", make_hf_checkpoint("tied", tmp_path / "hf"), gguf.GGMLQuantizationType.Q4_1,
               with_tokenizer=True)
    monkeypatch.setattr(prepare_checkpoint, "smollm2_gguf_path", lambda: tmp_path / "tiny.gguf")
    out_dir = tmp_path / "out"
    prepare_checkpoint.prepare(out_dir)
    args, state_dict = load_checkpoint(out_dir / "model.pth")
    gguf_args, gguf_state_dict = load_checkpoint(tmp_path / "tiny.gguf")
    assert args == gguf_args and state_dict.keys() == gguf_state_dict.keys()
    for key in state_dict:  # stored in float32: the dequantized values exactly
        assert state_dict[key].dtype == torch.float32 and torch.equal(state_dict[key], gguf_state_dict[key]), key
    tokenizer = load_tokenizer(out_dir / "model.pth")
    assert tokenizer.decode(tokenizer.encode("hello there")) == "hello there"

    (out_dir / "tokenizer.json").write_text("a user's edit")
    before = (out_dir / "model.pth").stat().st_mtime_ns
    capsys.readouterr()
    prepare_checkpoint.prepare(out_dir)
    assert "nothing to do" in capsys.readouterr().out
    assert (out_dir / "model.pth").stat().st_mtime_ns == before
    assert (out_dir / "tokenizer.json").read_text() == "a user's edit"


# ---- bad input: one-line ValueErrors ------------------------------------------------------------------------

def one_line_error(path) -> str:
    with pytest.raises(ValueError) as info:
        load_checkpoint(path)
    message = str(info.value)
    assert "\n" not in message and str(path) in message
    return message


def test_missing_path(tmp_path):
    assert "not found" in one_line_error(tmp_path / "nope" / "model.pth")


def test_dir_without_weights(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    assert "no checkpoint" in one_line_error(tmp_path)


def test_pth_without_model_args(tmp_path):
    torch.save({"tok_embeddings.weight": torch.zeros(2, 2)}, tmp_path / "model.pth")
    assert "model_args.json" in one_line_error(tmp_path / "model.pth")


def test_truncated_model_pth(tmp_path):
    make_hf_checkpoint("llama2", tmp_path / "hf")
    write_checkpoint(tmp_path / "out", *load_checkpoint(tmp_path / "hf"))
    with pytest.raises(ValueError, match="already exists"):
        write_checkpoint(tmp_path / "out", *load_checkpoint(tmp_path / "hf"))
    path = tmp_path / "out" / "model.pth"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    assert "damaged" in one_line_error(path)


def test_truncated_safetensors(tmp_path):
    make_hf_checkpoint("llama2", tmp_path)
    shard = sorted(tmp_path.glob("*.safetensors"))[-1]
    shard.write_bytes(shard.read_bytes()[:1000])
    assert "damaged" in one_line_error(tmp_path)


@pytest.mark.parametrize("keep", [0.5, 0.01])  # cut inside the tensor data, and inside the metadata
def test_truncated_gguf(keep, tmp_path):
    write_gguf(tmp_path / "full.gguf", make_hf_checkpoint("llama3", tmp_path / "hf"))
    data = (tmp_path / "full.gguf").read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[: int(len(data) * keep)])
    assert "damaged" in one_line_error(tmp_path / "cut.gguf")


def test_gguf_unsupported_type(tmp_path):
    write_gguf(tmp_path / "q5.gguf", make_hf_checkpoint("llama3", tmp_path / "hf"), gguf.GGMLQuantizationType.Q5_0)
    message = one_line_error(tmp_path / "q5.gguf")
    assert "Q5_0" in message and "token_embd.weight" in message
