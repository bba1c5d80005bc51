"""One registry of cache strategies. A strategy is one file in this folder that registers its class with @register
(the others hold what strategies share: base, stores, paging, evict, rotation; and mixed, several in one batch);
adding a strategy is adding a file. Every module is imported here, in file-name order (the registry's order), so the
registry fills itself. generate.py and scripts/evaluate.py build one subcommand per entry."""
import importlib
import pkgutil

from kv_cache.base import STRATEGIES, KVCache, register

for _module in pkgutil.iter_modules(__path__):
    if _module.name != "base":
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["STRATEGIES", "KVCache", "register"]
