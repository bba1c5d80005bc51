"""The Python API: text in, text out, any registered KV-cache strategy.

    from llm import LLM
    llm = LLM("checkpoints/smollm2-135m", strategy="quantize_kv", bits=4)
    for out in llm.generate(["Once upon a time,"], max_new_tokens=64):
        print(out["text"])

LLM loads the checkpoint and its tokenizer, sets up the caches (paged with block_size) for max_batch_size rows and
runs the engine (engine.py): up to max_batch_size prompts decode together, the rest join as rows free up.
"""
from pathlib import Path

import torch

import kv_cache
from checkpoint import default_checkpoint_path
from engine import Engine
from runner import compile_decode, decode_one_token, load_model, resolve_dtype, setup_cache
from scheduler import SamplingParams
from tokenizer import load_tokenizer


def prompt_tokens(tokenizer, text: str, chat: bool = False, system: str = None) -> list[int]:
    """The prompt's token ids: the chat template's rendering (which adds BOS itself where the model wants it,
    as transformers' apply_chat_template) or the text after BOS when the tokenizer asks for one. An empty prompt
    starts from BOS."""
    if chat:
        messages = ([{"role": "system", "content": system}] if system is not None else [])
        messages.append({"role": "user", "content": text})
        return chat_tokens(tokenizer, messages)
    ids = ([tokenizer.bos_id] if tokenizer.add_bos else []) + tokenizer.encode(text)
    if ids:
        return ids
    if tokenizer.bos_id is None:
        raise ValueError("the prompt is empty and this tokenizer has no BOS token to start from: give --prompt TEXT")
    return [tokenizer.bos_id]


def chat_tokens(tokenizer, messages: list[dict]) -> list[int]:
    """Token ids of a conversation rendered by the checkpoint's own chat template, ready for the assistant's turn."""
    if not tokenizer.chat_template:
        raise ValueError("--chat: this checkpoint has no chat template (no chat_template in its "
                         "tokenizer_config.json or GGUF metadata): drop --chat and write the prompt in the "
                         "model's own format")
    ids = tokenizer.encode(tokenizer.apply_chat_template(messages))
    if not ids:
        raise ValueError("--chat: the checkpoint's chat template rendered nothing: fix its chat_template")
    return ids


def until_stop(ids: list[int], stop_ids) -> list[int]:
    """A sequence's tokens up to (not including) its first stop token."""
    for i, token in enumerate(ids):
        if token in stop_ids:
            return ids[:i]
    return ids


class LLM:
    def __init__(self, checkpoint_path=None, strategy: str = "full", max_batch_size: int = 8,
                 max_seq_length: int = None, device: str = None, dtype: torch.dtype | str = None,
                 block_size: int = None, num_blocks: int = None, prefill_chunk_size: int = 512,
                 compile: bool = False, seed: int = 0, **options):
        """options: the strategy's own (e.g. bits=4, sink_size=16); defaults as on the command line.
        max_seq_length: the positions a row holds (default: the model's trained context). dtype: a torch dtype or its
        name (e.g. "bfloat16"; default: the device's)."""
        if strategy not in kv_cache.STRATEGIES:
            raise ValueError(f"unknown strategy {strategy!r}: choose one of {', '.join(kv_cache.STRATEGIES)}")
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        dtype = resolve_dtype(dtype, self.device)
        path = Path(checkpoint_path) if checkpoint_path else default_checkpoint_path()
        self.tokenizer = load_tokenizer(path)
        self.model = load_model(path, self.device, dtype)
        max_seq_length = max_seq_length or self.model.args.max_position_embeddings
        self.pool = setup_cache(self.model, strategy, options, max_batch_size, max_seq_length, quiet=True,
                                block_size=block_size, num_blocks=num_blocks)
        self.engine = Engine(self.model, compile_decode() if compile else decode_one_token, prefill_chunk_size,
                             seed)

    def generate(self, prompts: list[str], max_new_tokens: int = 200, temperature: float = 0.0, top_k: int = 0,
                 top_p: float = 1.0, chat: bool = False, system: str = None) -> list[dict]:
        """One dict per prompt, in order: text (the completion up to its end-of-sequence token), tokens (the
        completion's ids), finish_reason ("stop" or "length")."""
        if isinstance(prompts, str):
            prompts = [prompts]
        eos = tuple(self.tokenizer.eos_ids)
        params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                                stop_ids=eos)
        ids = [prompt_tokens(self.tokenizer, text, chat, system) for text in prompts]
        return [dict(text=self.tokenizer.decode(until_stop(r.tokens, eos)), tokens=r.tokens,
                     finish_reason=r.finish_reason) for r in self.engine.generate(ids, params)]
