"""Tokenizers, one small object whatever the checkpoint ships.

load_tokenizer(path) picks the backend from what it finds:
  a .gguf file                          -> tokenizers, built from the GGUF metadata (byte-level BPE vocabularies)
  tokenizer.json                        -> tokenizers, special tokens from tokenizer_config.json (HF dirs)
  tokenizer.model, tiktoken text format -> tiktoken with Llama-3's split pattern and special tokens (Meta's dirs)
  tokenizer.model, sentencepiece        -> sentencepiece (Llama-2)
tokenizer.json wins when both are there: it also knows the tokens a fine-tune added and, with
generation_config.json, every stop token (Llama-3.1 has three).
encode() never adds BOS: the caller puts bos_id first when add_bos is true.
The chat template comes with the tokenizer: GGUF metadata `tokenizer.chat_template`, or in a directory
chat_template.jinja / tokenizer_config.json's chat_template. apply_chat_template() renders it with jinja2 exactly as
transformers' apply_chat_template does.
"""
import base64
import datetime
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import sentencepiece
import tiktoken
from tokenizers import Regex, Tokenizer as HFTokenizer, decoders, pre_tokenizers, processors
from tokenizers.models import BPE

from gguf_file import open_gguf


@dataclass
class Tokenizer:
    encode: Callable[[str], list[int]]  # text -> ids, no BOS
    decode: Callable[[list[int]], str]
    bos_id: int | None
    eos_ids: set[int]  # any of these ends generation
    add_bos: bool  # whether a prompt should start with bos_id
    vocab_size: int
    chat_template: str | None = None  # Jinja source, as the checkpoint ships it
    bos_token: str | None = None  # token texts, the chat template's bos_token / eos_token variables
    eos_token: str | None = None

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """The conversation as the model was trained to read it (text; encode() turns its special tokens into ids).
        With add_generation_prompt the text ends where the assistant's answer begins."""
        if not self.chat_template:
            raise ValueError("this checkpoint has no chat template (no chat_template in its tokenizer_config.json "
                             "or GGUF metadata)")
        special = {"bos_token": self.bos_token, "eos_token": self.eos_token}
        return render_chat_template(self.chat_template, messages, add_generation_prompt,
                                    **{k: v for k, v in special.items() if v is not None})


def render_chat_template(template: str, messages: list[dict], add_generation_prompt: bool = True, **variables) -> str:
    """Render a Hugging Face chat template as transformers does (utils/chat_template_utils.py): a sandboxed,
    immutable Jinja environment (templates come from model repositories: untrusted code) with trim_blocks and
    lstrip_blocks, the loopcontrols extension, the {% generation %} tag, and the helpers templates call:
    raise_exception, strftime_now and a tojson that does not escape HTML. Template errors are one-line ValueErrors."""
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationTag(jinja2.ext.Extension):
        """{% generation %}...{% endgeneration %} marks the assistant's tokens for training masks; rendering keeps
        the body as it is (transformers' AssistantTracker when it is not tracking)."""
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(format):
        return datetime.datetime.now().strftime(format)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception, strftime_now=strftime_now)
    try:
        compiled = env.from_string(template)
        return compiled.render(messages=messages, tools=None, documents=None,
                               add_generation_prompt=add_generation_prompt, **variables)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise ValueError(f"the checkpoint's chat template is not valid Jinja (line {e.lineno}: {e.message}): "
                         "fix chat_template in its tokenizer_config.json") from None
    except jinja2.exceptions.TemplateError as e:  # raise_exception(...), an undefined name, the sandbox
        reason = " ".join(str(e).split())
        raise ValueError(f"the checkpoint's chat template refused the conversation: {reason}") from None
    except (TypeError, KeyError, IndexError, AttributeError) as e:  # e.g. a message field the template expects
        raise ValueError(f"the checkpoint's chat template failed ({type(e).__name__}: {e}): it expects other "
                         "messages than a user prompt (and --system)") from None


# Llama-3, as Meta's llama3/tokenizer.py (and gpt-fast) define it.
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
LLAMA3_SPECIAL_TOKENS = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>",
    "<|reserved_special_token_2|>",
    "<|reserved_special_token_3|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|reserved_special_token_4|>",
    "<|eot_id|>",
] + [f"<|reserved_special_token_{i}|>" for i in range(5, 256 - 5)]

# GGUF `tokenizer.ggml.pre` -> how the text is split before byte-level BPE (llama.cpp's llama-vocab.cpp).
GGUF_PRE_TOKENIZERS = {
    "gpt-2": pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    # Every numeral stands alone, as in SmolLM's own tokenizer.json and in llama.cpp. transformers' GGUF loader
    # leaves this out, so there whitespace before a numeral tokenizes differently ("\n\n1." -> Ċ Ċ 1 ., not ĊĊ 1 .).
    "smollm": pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    ),
    "llama-bpe": pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    ),
}


def load_tokenizer(path) -> Tokenizer:
    """path: a checkpoint directory, a file inside one, or a .gguf file."""
    path = Path(path)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ValueError(f"{path} does not exist; pass an existing .gguf file or a checkpoint directory")
        tokenizer, bos_token, eos_tokens, add_bos, chat_template = _read_gguf_tokenizer(path)
        eos_ids = {tokenizer.token_to_id(token) for token in eos_tokens}
        return _from_hf(tokenizer, bos_token, eos_ids, add_bos, chat_template, eos_tokens[0] if eos_tokens else None)
    directory = path if path.is_dir() else path.parent
    if (directory / "tokenizer.json").is_file():
        return _from_tokenizer_json(directory)
    if (directory / "tokenizer.model").is_file():
        tokenizer = _from_tokenizer_model(directory / "tokenizer.model")
        config = _tokenizer_config(directory)  # a HF directory's chat template, when one sits beside
        tokenizer.chat_template = _chat_template(directory, config)
        tokenizer.bos_token = _content(config.get("bos_token")) or tokenizer.bos_token
        tokenizer.eos_token = _content(config.get("eos_token")) or tokenizer.eos_token
        return tokenizer
    raise ValueError(
        f"no tokenizer in {directory}: copy the model's tokenizer.model or tokenizer.json there "
        "(or convert a GGUF with scripts/prepare_checkpoint.py)"
    )


def save_gguf_tokenizer(gguf_path, out_dir) -> None:
    """Write the tokenizer a GGUF describes as tokenizer.json + tokenizer_config.json in out_dir."""
    tokenizer, bos_token, eos_tokens, add_bos, chat_template = _read_gguf_tokenizer(Path(gguf_path))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(out_dir / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": bos_token,
        "eos_token": eos_tokens[0] if eos_tokens else None,
        "add_bos_token": add_bos,
        "chat_template": chat_template,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    if len(eos_tokens) > 1:  # e.g. <|eot_id|> besides <|end_of_text|>: HF dirs list all stop tokens here
        eos_ids = [tokenizer.token_to_id(token) for token in eos_tokens]
        (out_dir / "generation_config.json").write_text(json.dumps({"eos_token_id": eos_ids}) + "\n")


def _from_tokenizer_model(model_path: Path) -> Tokenizer:
    data = model_path.read_bytes()
    try:
        # Parsed here, not with tiktoken.load.load_tiktoken_bpe: that caches files by path under /tmp and
        # would keep serving the old copy after the file changes.
        ranks = {
            base64.b64decode(token, validate=True): int(rank)
            for token, rank in (line.split() for line in data.splitlines() if line)
        }
    except ValueError:  # not `base64token rank` lines: a sentencepiece protobuf
        ranks = None
    if not ranks:
        return _from_sentencepiece(model_path)
    special_ids = {token: len(ranks) + i for i, token in enumerate(LLAMA3_SPECIAL_TOKENS)}
    encoding = tiktoken.Encoding(
        name=model_path.parent.name, pat_str=LLAMA3_SPLIT, mergeable_ranks=ranks, special_tokens=special_ids
    )
    return Tokenizer(
        # Special-token text (e.g. from a chat template) becomes its id, as with tokenizer.json.
        encode=lambda text: encoding.encode(text, allowed_special="all"),
        decode=encoding.decode,
        bos_id=special_ids["<|begin_of_text|>"],
        eos_ids={special_ids["<|end_of_text|>"], special_ids["<|eot_id|>"]},
        add_bos=True,
        vocab_size=encoding.n_vocab,
        bos_token="<|begin_of_text|>",
        eos_token="<|end_of_text|>",
    )


def _from_sentencepiece(model_path: Path) -> Tokenizer:
    processor = sentencepiece.SentencePieceProcessor()
    try:
        processor.LoadFromSerializedProto(model_path.read_bytes())
    except RuntimeError:
        raise ValueError(
            f"{model_path} is neither a tiktoken nor a sentencepiece tokenizer.model; "
            "replace it with the model's original tokenizer file"
        ) from None
    bos_id, eos_id = processor.bos_id(), processor.eos_id()  # -1 when the model has none
    return Tokenizer(
        encode=processor.encode,
        decode=processor.decode,
        bos_id=bos_id if bos_id >= 0 else None,
        eos_ids={eos_id} if eos_id >= 0 else set(),
        add_bos=bos_id >= 0,
        vocab_size=processor.vocab_size(),
        bos_token=processor.id_to_piece(bos_id) if bos_id >= 0 else None,
        eos_token=processor.id_to_piece(eos_id) if eos_id >= 0 else None,
    )


def _from_tokenizer_json(directory: Path) -> Tokenizer:
    try:
        tokenizer = HFTokenizer.from_file(str(directory / "tokenizer.json"))
    except Exception as e:  # tokenizers raises a bare Exception
        raise ValueError(
            f"cannot read {directory / 'tokenizer.json'} ({e}); replace it with the model's original tokenizer.json"
        ) from None
    config = _tokenizer_config(directory)
    eos_token = _content(config.get("eos_token"))
    eos_ids = {tokenizer.token_to_id(eos_token)} if eos_token else set()
    if (directory / "generation_config.json").is_file():  # where HF dirs list every stop token (Llama-3: eot too)
        generation_eos = json.loads((directory / "generation_config.json").read_text()).get("eos_token_id")
        eos_ids |= {generation_eos} if isinstance(generation_eos, int) else set(generation_eos or [])
    return _from_hf(tokenizer, _content(config.get("bos_token")), eos_ids - {None}, config.get("add_bos_token"),
                    _chat_template(directory, config), eos_token)


def _tokenizer_config(directory: Path) -> dict:
    config = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):  # the later file wins
        if (directory / name).is_file():
            config.update(json.loads((directory / name).read_text()))
    return config


def _content(token):  # tokenizer_config writes a token as "<s>" or {"content": "<s>", ...}
    return token["content"] if isinstance(token, dict) else token


def _chat_template(directory: Path, config: dict):
    """The directory's chat template, where transformers looks: chat_template.jinja (what transformers >= 4.50
    saves) before tokenizer_config.json's chat_template, which may also be a list of named templates ("default")."""
    if (directory / "chat_template.jinja").is_file():
        return (directory / "chat_template.jinja").read_text(encoding="utf-8")
    template = config.get("chat_template")
    if isinstance(template, list):
        template = {entry.get("name"): entry.get("template") for entry in template}.get("default")
    return template or None


def _from_hf(tokenizer: HFTokenizer, bos_token, eos_ids, add_bos, chat_template=None, eos_token=None) -> Tokenizer:
    bos_id = tokenizer.token_to_id(bos_token) if bos_token else None
    if add_bos is None:  # no flag: does the post-processor put BOS first (HF Llama-3 dirs)?
        add_bos = bos_id is not None and tokenizer.encode("a").ids[:1] == [bos_id]
    return Tokenizer(
        encode=lambda text: tokenizer.encode(text, add_special_tokens=False).ids,
        decode=lambda ids: tokenizer.decode(ids, skip_special_tokens=False),
        bos_id=bos_id,
        eos_ids=eos_ids,
        add_bos=bool(add_bos),
        vocab_size=tokenizer.get_vocab_size(with_added_tokens=True),
        chat_template=chat_template or None,
        bos_token=bos_token or None,
        eos_token=eos_token,
    )


def _read_gguf_tokenizer(gguf_path: Path):
    """(tokenizers.Tokenizer, bos token, eos tokens, add_bos, chat template) from a GGUF's metadata,
    built like transformers' GGUF loader builds a `gpt2` (byte-level BPE) vocabulary."""
    try:
        fields = open_gguf(gguf_path).fields
    except Exception as e:  # gguf raises ValueError, struct.error, ... on a truncated or foreign file
        raise ValueError(f"cannot read {gguf_path} as GGUF ({e}); pass a complete .gguf file") from None

    def get(key, default=None):
        return fields[key].contents() if key in fields else default

    model, pre = get("tokenizer.ggml.model"), get("tokenizer.ggml.pre", "gpt-2")
    if model != "gpt2" or pre not in GGUF_PRE_TOKENIZERS or "tokenizer.ggml.merges" not in fields:
        raise ValueError(
            f"{gguf_path.name}: GGUF tokenizer {model!r} with pre-tokenizer {pre!r} is not supported (only byte-level "
            f"'gpt2' with {sorted(GGUF_PRE_TOKENIZERS)}); use the model's Hugging Face directory with tokenizer.json"
        )
    tokens = get("tokenizer.ggml.tokens")
    merges = [tuple(merge.split(" ")) for merge in get("tokenizer.ggml.merges")]
    tokenizer = HFTokenizer(BPE({token: i for i, token in enumerate(tokens)}, merges, fuse_unk=False))
    tokenizer.pre_tokenizer = GGUF_PRE_TOKENIZERS[pre]
    tokenizer.decoder = decoders.ByteLevel()
    # Token types (llama.cpp): 3 = control, matched whole as a special token; 4 = user-defined, matched whole
    # but plain. Without this `<|im_end|>` in a chat prompt would be cut into pieces.
    token_types = get("tokenizer.ggml.token_type", [])
    tokenizer.add_special_tokens([t for t, kind in zip(tokens, token_types) if kind == 3])
    tokenizer.add_tokens([t for t, kind in zip(tokens, token_types) if kind == 4])

    bos_id = get("tokenizer.ggml.bos_token_id")
    bos_token = tokens[bos_id] if bos_id is not None else None
    eos_keys = ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id")
    eos_tokens = list(dict.fromkeys(tokens[get(key)] for key in eos_keys if key in fields))
    add_bos = bool(get("tokenizer.ggml.add_bos_token", False))  # transformers' default for a gpt2 vocabulary
    if add_bos and bos_token is not None:  # so tokenizer.json alone also says it
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos_token} $A", pair=f"{bos_token} $A {bos_token} $B", special_tokens=[(bos_token, bos_id)]
        )
    return tokenizer, bos_token, eos_tokens, add_bos, get("tokenizer.chat_template")
