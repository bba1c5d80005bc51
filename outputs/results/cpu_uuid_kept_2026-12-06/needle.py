# What kept.py, answers.py and kvzip_scores.py share: the model and a RULER task's prompts at a length (one load),
# a configuration's cache options beside them (sinks/window 16/32 unless full), and where a prompt's needle sits.
import sys
sys.path.insert(0, ".")
from scripts import evaluate as ev

SINKS, WINDOW = 16, 32  # every configuration's sinks and window here

def load(task: str, length: int, samples: str = None):
    """(base options, model, tokenizer, prompts): samples "0,1,2" keeps those, None all 10."""
    base = ["--max_tokens", "0", "--rouge_prompts", "0", "--retrieval_lengths", "", "--max_position", "0",
            "--ruler_samples", "10", "--ruler_lengths", str(length), "--ruler", task]
    args, _ = ev.parse(["full"] + base)
    model, tok, _ = ev.load(args)
    prompts = ev.ruler_prompts(tok, args)
    if samples is not None:
        prompts = [p for p in prompts if p["index"] in {int(i) for i in samples.split(",")}]
    return base, model, tok, prompts


def options(base: list, config: list) -> dict:
    """The cache options of a configuration ("tova --budget 360 ..." split), SINKS/WINDOW unless it is full."""
    extra = [] if config[0] == "full" else ["--sink_size", str(SINKS), "--window_size", str(WINDOW)]
    return ev.parse([config[0]] + base + extra + config[1:])[1]


def span(pieces: list, answer: str) -> tuple:
    """(start, end) of the needle's tokens: the shortest run whose text, stripped, is the answer (a digit or a UUID's
    piece a token; a blank token before it can be the run's first)."""
    return next((i, j) for i in range(len(pieces)) for j in range(i + 1, min(len(pieces), i + len(answer)) + 1)
                if "".join(pieces[i:j]).strip() == answer)
