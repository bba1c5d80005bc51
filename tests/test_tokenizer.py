"""tokenizer.py against transformers' tokenizers for the same files, on a few thousand words of mixed text.

(a) the embedded SmolLM2 GGUF, read directly and through save_gguf_tokenizer -> tokenizer.json;
(b) a Llama-3 style tiktoken tokenizer.model (byte-level BPE ranks trained here, Meta's file format), and the same
    vocabulary as a llama.cpp-style GGUF (pre-tokenizer llama-bpe, BOS added, <|eot_id|> as eot);
(c) a Llama-2 style sentencepiece tokenizer.model (BPE with byte fallback, trained here).
Two known differences are pinned below: SmolLM2 numerals (tokenizer.py follows SmolLM's own tokenizer, transformers'
GGUF loader does not) and a leading space before sentencepiece's dummy prefix (transformers differs from sentencepiece).
"""
import base64
import io
import json
import random

import gguf
import pytest
import regex
import sentencepiece
from tokenizers import AddedToken, Regex, Tokenizer as HFTokenizer, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, LlamaTokenizer
from transformers.convert_slow_tokenizer import bytes_to_unicode
from transformers.tokenization_utils_base import generate_merges

from tokenizer import LLAMA3_SPECIAL_TOKENS, LLAMA3_SPLIT, load_tokenizer, save_gguf_tokenizer

WORDS = {
    "prose": (
        "the quick brown fox jumps over lazy dog and then a of to in is was for on with as at by it "
        "The A This However Meanwhile Paris London John's don't It's they'll WE'RE you've I'd isn't "
        "O'Neil can't won't shouldn't've HELLO World tokenization generation cache compression"
    ).split(),
    "punctuation": ". , ! ? ... ; : — – - ( ) [ ] { } \" ' ` ~ # @ % & * + = / \\ | _ ^ < > « » “ ” ‘ ’".split(),
    "code": [
        "def", "foo(x):", "return", "x**2", "self.k_cache[:,", ":,", "idx]", "for", "i", "in", "range(10):",
        "if", "(a", "&&", "b)", "{", "}", "std::vector<int>", "#include", "<stdio.h>", "0x1F", "1e-5",
        'printf("%d\\n",', "n);", "snake_case_name", "camelCaseName", "->", "=>", "!=", "==", "<=", ">>=",
        "https://example.com/a/b?c=1&d=2", "user@example.org", "/*", "*/", "//", "import", "torch.nn.functional",
        "x.view(B,", "T,", "-1)", "@torch.no_grad()", "lambda:", "None", "True", "'''", "```python",
    ],
    "unicode": [
        "café", "naïve", "résumé", "Ångström", "façade", "Straße", "jalapeño", "Zoë", "e\u0301t\u0301e\u0301",
        "你好", "世界", "日本語", "テキスト", "カタカナ", "ひらがな", "한국어", "텍스트입니다", "中文分词测试",
        "😀", "👍🏽", "👨‍👩‍👧‍👦", "🇫🇷", "❤️", "🚀🚀", "Привет", "мир", "αβγ", "Ωμέγα", "مرحبا", "שלום",
        "नमस्ते", "สวัสดี", "∑", "∫dx", "≤", "→", "25°C", "€", "£", "¥", "non\u00a0breaking", "zero\u200bwidth",
        "ideo\u3000space", "ﬁ", "Ⓐ", "\U0001d400", "ŉ", "İstanbul",
    ],
    "digits": [
        "0", "7", "42", "123", "2024", "3.14159", "1,000,000", "12345678901234", "-17", "+3", "v2.0.1", "1st",
        "2nd", "10%", "$5.99", "１２３", "一二三",
    ],
}
# Non-ASCII numerals: where SmolLM's pre-tokenizer and transformers' GGUF loader part ways (see tokenizer.py).
NUMERALS = ["½", "²", "³", "¼", "①", "Ⅻ", "٣٤٥", "१२३", "〇", "x²", "m³"]
SYLLABLES = "ka lo men ti ra su be on ex qu ar is ent ion str pre tho ng ch sh wo rd al ve ly ing".split()
SEPARATORS = [" "] * 12 + ["", "  ", "   ", "\t", "\t\t", " \t ", "\n", "\n\n", "\n\n\n", " \n", "\r\n", "\n    ", "\n\t"]


def mixed_text(seed: int, n_words: int = 3000, numerals: bool = False) -> str:
    rng = random.Random(seed)
    kinds = list(WORDS) + ["made-up", "number"] + (["numerals"] if numerals else [])
    weights = [5, 2, 3, 2, 1, 3, 1] + ([1] if numerals else [])
    pieces = [" leading space", "  two leading spaces\n"]
    for _ in range(n_words):
        kind = rng.choices(kinds, weights)[0]
        if kind == "made-up":  # enough distinct words for a few thousand BPE merges
            word = "".join(rng.choices(SYLLABLES, k=rng.randint(1, 4)))
            word = word.capitalize() if rng.random() < 0.2 else word
        elif kind == "number":
            word = str(rng.randint(0, 10 ** rng.randint(1, 9)))
        else:
            word = rng.choice(NUMERALS if kind == "numerals" else WORDS[kind])
        pieces += [word, rng.choice(SEPARATORS)]
    return "".join(pieces) + "trailing spaces   \n\n"


TEXT = mixed_text(0)


def test_mixed_text_is_mixed():
    assert len(TEXT.split()) > 2500
    for needle in ["\t", "\r\n", "   ", "\n\n\n", "你好", "👨‍👩‍👧‍👦", "e\u0301", "12345678901234", "don't"]:
        assert needle in TEXT


# ---- (a) SmolLM2 GGUF ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2_ours(smollm2_gguf_path):
    return load_tokenizer(smollm2_gguf_path)


@pytest.fixture(scope="module")
def smollm2_transformers(smollm2_gguf_path):
    return AutoTokenizer.from_pretrained(smollm2_gguf_path.parent, gguf_file=smollm2_gguf_path.name)


@pytest.fixture(scope="module")
def smollm2_converted_dir(smollm2_gguf_path, tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("smollm2")
    save_gguf_tokenizer(smollm2_gguf_path, out_dir)
    return out_dir


def numerals_apart(hf_tokenizer, text):
    """transformers' encoding of `text` with every numeral (\\p{N}) cut out as its own piece first: what SmolLM's
    own tokenizer.json (Digits(individual_digits=True) before ByteLevel) and llama.cpp's `smollm` do."""
    pieces = [piece for piece in regex.split(r"(\p{N})", text) if piece]
    return [i for piece in pieces for i in hf_tokenizer.encode(piece, add_special_tokens=False)]


def test_smollm2_gguf_matches_transformers(smollm2_ours, smollm2_transformers):
    no_numerals = regex.sub(r"\p{N}", "", TEXT)
    assert smollm2_ours.encode(no_numerals) == smollm2_transformers.encode(no_numerals, add_special_tokens=False)
    for text in [TEXT, mixed_text(1, numerals=True)]:
        ids = smollm2_ours.encode(text)
        assert ids == numerals_apart(smollm2_transformers, text)
        assert smollm2_ours.decode(ids) == text
    chat = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    assert smollm2_ours.encode(chat) == smollm2_transformers.encode(chat, add_special_tokens=False)
    assert smollm2_ours.encode(chat)[0] == 1 and 2 in smollm2_ours.encode(chat)


def test_smollm2_whitespace_before_a_numeral_stays_apart(smollm2_ours, smollm2_transformers):
    """Where transformers' GGUF loader differs: it lets whitespace run into a following numeral (GPT-2's regex
    alone), which SmolLM's tokenizer never did, so there "\\n\\n1." would give Ċ Ċ 1 and " ½" would give ĠÂ ½."""
    for text, tokens in [("a\n\n1.", ["a", "ĊĊ", "1", "."]), ("x ½", ["x", "Ġ", "Â½"]), ("a  2", ["a", "ĠĠ", "2"])]:
        assert smollm2_transformers.convert_ids_to_tokens(smollm2_ours.encode(text)) == tokens


def test_smollm2_special_ids(smollm2_ours, smollm2_transformers):
    assert smollm2_ours.bos_id == smollm2_transformers.bos_token_id == 1
    assert smollm2_ours.eos_ids == {smollm2_transformers.eos_token_id} == {2}
    assert smollm2_ours.add_bos is False
    assert smollm2_transformers.encode("hi")[0] != 1  # transformers adds no BOS either
    assert smollm2_ours.vocab_size == len(smollm2_transformers) == 49152


def test_saved_gguf_tokenizer_loads_as_tokenizer_json(smollm2_ours, smollm2_converted_dir):
    ours = load_tokenizer(smollm2_converted_dir / "model.pth")  # a file inside the checkpoint dir
    text = mixed_text(1, numerals=True)
    assert ours.encode(text) == smollm2_ours.encode(text)
    assert ours.decode(ours.encode(text)) == text
    assert (ours.bos_id, ours.eos_ids, ours.add_bos, ours.vocab_size) == (1, {2}, False, 49152)
    config = json.loads((smollm2_converted_dir / "tokenizer_config.json").read_text())
    assert config["bos_token"] == "<|im_start|>" and config["eos_token"] == "<|im_end|>"
    assert config["add_bos_token"] is False
    assert config["chat_template"].startswith("{% for message in messages %}")


def test_saved_gguf_tokenizer_reads_the_same_in_transformers(smollm2_ours, smollm2_converted_dir, smollm2_transformers):
    theirs = AutoTokenizer.from_pretrained(smollm2_converted_dir)
    text = mixed_text(1, numerals=True)
    assert theirs.encode(text, add_special_tokens=False) == smollm2_ours.encode(text)
    assert theirs.encode("hi") == smollm2_transformers.encode("hi")  # no BOS
    assert (theirs.bos_token_id, theirs.eos_token_id) == (1, 2)
    messages = [{"role": "user", "content": "Hi"}]
    assert theirs.apply_chat_template(messages, tokenize=False) == smollm2_transformers.apply_chat_template(
        messages, tokenize=False
    )


# ---- chat templates, rendered as transformers' apply_chat_template renders them -----------------------------

CHAT_MESSAGES = [
    [{"role": "user", "content": "What is the capital of France? Answer in 3 words."}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name 2 rivers, café-style."}],
]
# A Llama-3.1-like template that uses what transformers gives templates: bos_token/eos_token, raise_exception,
# strftime_now, namespace, loop controls ({% continue %}, {% break %}), whitespace control under trim_blocks and
# lstrip_blocks, tojson, {% generation %} and add_generation_prompt.
RICH_TEMPLATE = """{{- bos_token }}
{%- set ns = namespace(system="") %}
{%- for message in messages %}
    {%- if message['role'] == 'system' %}
        {%- set ns.system = message['content'] %}
        {% continue %}
    {%- endif %}
    {%- if message['role'] not in ['user', 'assistant'] %}
        {{- raise_exception('Only user and assistant roles are supported') }}
    {%- endif %}
{%- endfor %}
<|im_start|>system
Date: {{ strftime_now('%Y') }}. {{ ns.system if ns.system else 'No system prompt.' }} {{ {'n': 1, 'é': 'ü'} | tojson }}
<|im_end|>
{% for message in messages if message['role'] != 'system' %}
    {% if loop.index > 4 %}{% break %}{% endif %}
<|im_start|>{{ message['role'] }}
    {% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] | trim }}{% endgeneration %}
    {% else %}{{ message['content'] | trim }}{% endif %}
{{ eos_token }}
{% endfor %}
{% if add_generation_prompt %}
<|im_start|>assistant
{% endif %}"""


def transformers_chat_ids(tokenizer, messages, template=None):
    out = tokenizer.apply_chat_template(messages, chat_template=template, add_generation_prompt=True, tokenize=True)
    return list(out["input_ids"] if hasattr(out, "keys") else out)  # transformers 5 returns a BatchEncoding


@pytest.mark.parametrize("messages", CHAT_MESSAGES, ids=["user", "system+user"])
def test_chat_template_matches_transformers(smollm2_ours, smollm2_transformers, smollm2_converted_dir, messages):
    """The GGUF's own ChatML template (and the same template from tokenizer_config.json), token for token."""
    converted = load_tokenizer(smollm2_converted_dir)
    converted_transformers = AutoTokenizer.from_pretrained(smollm2_converted_dir)
    assert smollm2_ours.chat_template == converted.chat_template == smollm2_transformers.chat_template
    text = smollm2_ours.apply_chat_template(messages)
    assert text == smollm2_transformers.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text.endswith("<|im_start|>assistant\n") and ("You are terse." in text) == (len(messages) == 2)
    assert converted.apply_chat_template(messages) == text
    # token for token; the GGUF-loaded transformers tokenizer splits whitespace before numerals its own way (above)
    assert converted.encode(text) == transformers_chat_ids(converted_transformers, messages)
    assert smollm2_ours.encode(text) == numerals_apart(smollm2_transformers, text)


@pytest.mark.parametrize("messages", CHAT_MESSAGES + [CHAT_MESSAGES[1] + [
    {"role": "assistant", "content": " Seine, Loire. "}, {"role": "user", "content": "More?"}]],
    ids=["user", "system+user", "multi-turn"])
def test_rich_chat_template_matches_transformers(smollm2_converted_dir, tmp_path, messages):
    directory = tmp_path / "rich"
    directory.mkdir()
    (directory / "tokenizer.json").write_bytes((smollm2_converted_dir / "tokenizer.json").read_bytes())
    config = json.loads((smollm2_converted_dir / "tokenizer_config.json").read_text())
    (directory / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": RICH_TEMPLATE}))
    ours, theirs = load_tokenizer(directory), AutoTokenizer.from_pretrained(directory)
    text = ours.apply_chat_template(messages)
    assert text == theirs.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert ours.encode(text) == transformers_chat_ids(theirs, messages)
    assert text.startswith("<|im_start|><|im_start|>system\nDate: 20") and '{"n": 1, "é": "ü"}' in text
    # chat_template.jinja (what transformers >= 4.50 saves) wins over tokenizer_config.json, as in transformers
    (directory / "chat_template.jinja").write_text("{{ bos_token }}{{ messages[-1]['content'] }}")
    assert load_tokenizer(directory).apply_chat_template(messages) == "<|im_start|>" + messages[-1]["content"]
    assert AutoTokenizer.from_pretrained(directory).apply_chat_template(messages, tokenize=False) == \
        "<|im_start|>" + messages[-1]["content"]


def test_chat_template_errors_are_one_line(smollm2_converted_dir, tmp_path):
    directory = tmp_path / "bad"
    directory.mkdir()
    (directory / "tokenizer.json").write_bytes((smollm2_converted_dir / "tokenizer.json").read_bytes())
    config = json.loads((smollm2_converted_dir / "tokenizer_config.json").read_text())
    for template, message in [(RICH_TEMPLATE, "refused the conversation: Only user and assistant roles"),
                              ("{% for m in messages %}", "is not valid Jinja"),
                              ("{{ messages.__class__.__mro__ }}", "refused the conversation"),  # the sandbox
                              (None, "no chat template")]:
        (directory / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": template}))
        with pytest.raises(ValueError, match=message) as error:
            load_tokenizer(directory).apply_chat_template([{"role": "tool", "content": "x"}])
        assert "\n" not in str(error.value)


# ---- (b) Llama-3 tiktoken tokenizer.model ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def llama3_bpe():
    """A byte-level BPE of 3000 merges trained here with Llama-3's split pattern: (tokens in rank order, merges)."""
    bpe = HFTokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(LLAMA3_SPLIT), "isolated"), pre_tokenizers.ByteLevel(use_regex=False)]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=256 + 3000, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    bpe.train_from_iterator([mixed_text(seed) for seed in range(10, 14)], trainer)
    model = json.loads(bpe.to_str())["model"]
    tokens = sorted(model["vocab"], key=model["vocab"].get)
    assert [model["vocab"][token] for token in tokens] == list(range(256 + 3000))
    return tokens, [" ".join(merge) for merge in model["merges"]]


@pytest.fixture(scope="module")
def tiktoken_dir(llama3_bpe, tmp_path_factory):
    """A tokenizer.model in Meta's Llama-3 format: `base64(token bytes) rank` lines."""
    tokens, _ = llama3_bpe
    byte_of = {char: byte for byte, char in bytes_to_unicode().items()}
    ranks = [bytes(byte_of[char] for char in token) for token in tokens]
    assert all(bytes([b]) in ranks for b in range(256))
    directory = tmp_path_factory.mktemp("llama3")
    lines = [f"{base64.b64encode(token).decode()} {rank}\n" for rank, token in enumerate(ranks)]
    (directory / "tokenizer.model").write_text("".join(lines))
    return directory, len(ranks)


@pytest.fixture(scope="module")
def tiktoken_transformers(tiktoken_dir):
    """transformers converts a tiktoken tokenizer.model (TikTokenConverter, as for Meta's Llama-3 files) with
    the special tokens the dir's tokenizer_config.json lists, as convert_llama_weights_to_hf writes them."""
    directory, _ = tiktoken_dir
    reference_dir = directory.parent / "llama3_transformers"
    reference_dir.mkdir()
    (reference_dir / "tokenizer.model").write_bytes((directory / "tokenizer.model").read_bytes())
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<|begin_of_text|>",
        "eos_token": "<|end_of_text|>",
        "extra_special_tokens": LLAMA3_SPECIAL_TOKENS,
    }
    (reference_dir / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TIKTOKEN_CACHE_DIR", "")  # tiktoken would otherwise cache the file by path under /tmp
        return AutoTokenizer.from_pretrained(reference_dir)


def test_tiktoken_matches_transformers(tiktoken_dir, tiktoken_transformers):
    directory, _ = tiktoken_dir
    ours = load_tokenizer(directory)
    for text in [TEXT, mixed_text(2, numerals=True)]:
        ids = ours.encode(text)
        assert ids == tiktoken_transformers.encode(text, add_special_tokens=False)
        assert ours.decode(ids) == text
    assert len(set(ours.encode(TEXT))) > 500  # the merges are really used


def test_tiktoken_special_tokens(tiktoken_dir, tiktoken_transformers):
    directory, n_base = tiktoken_dir
    ours = load_tokenizer(directory / "model.pth")
    # Meta's ids, as offsets from the base vocabulary (128000 in Llama-3)
    assert ours.bos_id == n_base and ours.eos_ids == {n_base + 1, n_base + 9}
    assert ours.add_bos is True and ours.vocab_size == n_base + 256
    named = {"<|start_header_id|>": 6, "<|end_header_id|>": 7, "<|eot_id|>": 9, "<|reserved_special_token_250|>": 255}
    for token, offset in named.items():
        assert ours.encode(token) == [n_base + offset] == tiktoken_transformers.encode(token, add_special_tokens=False)
    chat = "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
    assert ours.encode(chat) == tiktoken_transformers.encode(chat, add_special_tokens=False)
    assert ours.decode(ours.encode(chat)) == chat


def test_llama3_style_gguf_matches_transformers(llama3_bpe, tmp_path):
    """A GGUF as llama.cpp writes Llama-3's tokenizer: pre-tokenizer llama-bpe, add_bos, <|eot_id|> as eot."""
    tokens, merges = llama3_bpe
    n_base = len(tokens)
    writer = gguf.GGUFWriter(str(tmp_path / "llama3.gguf"), "llama")
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("llama-bpe")
    writer.add_token_list(tokens + LLAMA3_SPECIAL_TOKENS)
    writer.add_token_types([1] * n_base + [3] * len(LLAMA3_SPECIAL_TOKENS))  # 3: control
    writer.add_token_merges(merges)
    writer.add_bos_token_id(n_base)
    writer.add_eos_token_id(n_base + 1)
    writer.add_eot_token_id(n_base + 9)
    writer.add_add_bos_token(True)
    writer.add_chat_template("{{ bos_token }}{% for m in messages %}{{ m['content'] }}<|eot_id|>{% endfor %}")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    theirs = AutoTokenizer.from_pretrained(tmp_path, gguf_file="llama3.gguf")
    ours = load_tokenizer(tmp_path / "llama3.gguf")
    save_gguf_tokenizer(tmp_path / "llama3.gguf", tmp_path / "converted")
    converted = load_tokenizer(tmp_path / "converted")
    chat = "<|start_header_id|>user<|end_header_id|>\n\nHi there<|eot_id|>"
    for text in [TEXT, mixed_text(4, numerals=True), chat]:
        assert ours.encode(text) == converted.encode(text) == theirs.encode(text, add_special_tokens=False)
        assert ours.decode(ours.encode(text)) == text
    for tokenizer in [ours, converted]:
        assert tokenizer.bos_id == theirs.bos_token_id == n_base and tokenizer.add_bos is True
        assert tokenizer.eos_ids == {n_base + 1, n_base + 9} and tokenizer.vocab_size == n_base + 256
    # The GGUF says add_bos_token: transformers reading the converted folder adds BOS as llama.cpp does (its own GGUF
    # loader honours the flag in some releases only, 5.18 not: it is no reference for BOS).
    assert AutoTokenizer.from_pretrained(tmp_path / "converted").encode("hi") == [n_base, *ours.encode("hi")]
    # Without the flag (HF Llama-3 dirs), add_bos comes from the post-processor.
    config_path = tmp_path / "converted" / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    del config["add_bos_token"]
    config_path.write_text(json.dumps(config))
    assert load_tokenizer(tmp_path / "converted").add_bos is True


# ---- (c) Llama-2 sentencepiece tokenizer.model ---------------------------------------------------------------


@pytest.fixture(scope="module")
def sentencepiece_dir(tmp_path_factory):
    """A sentencepiece BPE with Llama-2's training options, vocabulary 1000."""
    model = io.BytesIO()
    lines = [line for seed in range(20, 24) for line in mixed_text(seed).splitlines() if line.strip()]
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=model,
        model_type="bpe",
        vocab_size=1000,
        byte_fallback=True,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        remove_extra_whitespaces=False,
        normalization_rule_name="identity",
        character_coverage=0.99,
        minloglevel=2,
    )
    directory = tmp_path_factory.mktemp("llama2")
    (directory / "tokenizer.model").write_bytes(model.getvalue())
    return directory


def transformers_llama_tokenizer(directory):
    """transformers' LlamaTokenizer.from_pretrained(directory) for a sentencepiece tokenizer.model. That reads the
    pieces with protobuf (SentencePieceExtractor.extract), which is not a dependency here; without it, the same
    pieces come from sentencepiece and go through the same steps."""
    try:
        import google.protobuf  # noqa: F401
    except ImportError:
        processor = sentencepiece.SentencePieceProcessor(model_file=str(directory / "tokenizer.model"))
        vocab = {processor.id_to_piece(i): i for i in range(processor.get_piece_size())}
        control = [
            AddedToken(processor.id_to_piece(i), normalized=False, special=True)
            for i in range(processor.get_piece_size())
            if processor.is_control(i)
        ]
        return LlamaTokenizer(vocab=vocab, merges=generate_merges(vocab), additional_special_tokens=control)
    return LlamaTokenizer.from_pretrained(directory)


def test_sentencepiece_matches_transformers(sentencepiece_dir):
    ours = load_tokenizer(sentencepiece_dir)
    theirs = transformers_llama_tokenizer(sentencepiece_dir)
    for text in [TEXT, mixed_text(3, numerals=True)]:
        # Not from a leading space: sentencepiece puts its dummy prefix before it too (" x" -> ▁▁x),
        # transformers' Metaspace(prepend_scheme="first") does not (▁x). Everywhere else they agree.
        text = text.lstrip(" ")
        ids = ours.encode(text)  # no BOS: compared with theirs without special tokens
        assert ids == theirs.encode(text, add_special_tokens=False)
        assert ours.decode(ids) == theirs.decode(ids) == text
    assert any(piece.startswith("<0x") for piece in theirs.convert_ids_to_tokens(ids))  # byte fallback was used
    assert ours.bos_id == theirs.bos_token_id == 1 and ours.eos_ids == {theirs.eos_token_id} == {2}
    assert ours.add_bos is True  # Llama-2 prompts start with <s>
    assert ours.vocab_size == len(theirs) == 1000


# ---- errors ------------------------------------------------------------------------------------------------------


def test_missing_or_unreadable_tokenizer_is_one_line_error(tmp_path):
    with pytest.raises(ValueError, match="no tokenizer in"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.model").write_bytes(b"\x00\x01 not a tokenizer\n")
    with pytest.raises(ValueError, match="neither a tiktoken nor a sentencepiece"):
        load_tokenizer(tmp_path / "model.pth")
    (tmp_path / "broken.gguf").write_bytes(b"GGUF\x03\x00")
    with pytest.raises(ValueError, match="cannot read"):
        load_tokenizer(tmp_path / "broken.gguf")
    with pytest.raises(ValueError, match="does not exist"):
        load_tokenizer(tmp_path / "missing.gguf")
    writer = gguf.GGUFWriter(str(tmp_path / "spm.gguf"), "llama")  # a sentencepiece vocabulary (Llama-2 GGUFs)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(["<unk>", "<s>", "</s>", "▁a"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValueError, match="is not supported"):
        load_tokenizer(tmp_path / "spm.gguf")
