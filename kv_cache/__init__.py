"""One registry of cache strategies. Each file in this folder defines one strategy and registers it with
@register; adding a strategy is adding a file. generate.py and scripts/evaluate.py build one subcommand per entry."""
import importlib
import pkgutil

from kv_cache.base import STRATEGIES, KVCache, register

for _module in pkgutil.iter_modules(__path__):
    if _module.name != "base":
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["STRATEGIES", "KVCache", "register"]
