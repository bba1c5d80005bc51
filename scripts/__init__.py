"""Scripts over the library, run from the repository root as `python -m scripts.NAME` (scripts/README.md)."""
