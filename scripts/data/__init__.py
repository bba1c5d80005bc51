"""Evaluation data: the corpus and retrieval prompts (corpus.py) and RULER's samples and scoring (ruler.py); libraries
of scripts/evaluate.py, not entry points."""
