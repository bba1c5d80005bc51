"""Several KV configurations in one batch: each configuration owns a fixed range of the batch's rows and a cache of
its own strategy (paged in its own pool), and one decode step runs every row, so requests that chose full, int4 or
snapkv share one pass over the weights. The model sees one cache per layer, as always: MixedCache routes each
group's rows to its sub-cache (static row ranges, so the decode step stays one graph) and model.py knows nothing
of it. Built by runner.setup_mixed_cache; not a registered strategy (it is a batch of them)."""
from typing import Optional

import torch
import torch.nn as nn
from torch import Tensor

from kv_cache.paging import RowGroup


class MixedCache(nn.Module):
    def __init__(self, caches: list, names: list[str]):
        """caches: one layer's sub-caches, in row order (each its own batch of rows); names: their configurations."""
        super().__init__()
        self.caches = nn.ModuleList(caches)
        starts = [0]
        for cache in caches:
            starts.append(starts[-1] + cache.batch_size)
        self.groups = [RowGroup(name, start, stop, cache.pool, cache.capacity(cache.opts, cache.max_seq_length))
                       for name, cache, start, stop in zip(names, caches, starts, starts[1:])]
        self.batch_size = starts[-1]
        self.max_seq_length = max(cache.max_seq_length for cache in caches)
        self.whole_prompt = any(cache.whole_prompt for cache in caches)  # snapkv's prompts: one chunk for all
        self.pool = RoutedPool(self.groups) if any(g.pool is not None for g in self.groups) else None

    def row_groups(self) -> list[RowGroup]:
        return self.groups

    def group_of(self, row: int) -> int:
        return next(i for i, g in enumerate(self.groups) if g.start <= row < g.stop)

    def forward(self, q: Tensor, k: Tensor, v: Tensor, input_pos: Tensor, rope_cos: Tensor, rope_sin: Tensor,
                rows: Optional[Tensor] = None) -> Tensor:
        if rows is None:  # the decode step: every row, each group's through its own cache
            assert q.shape[0] == self.batch_size, "the decode step runs every row of a mixed batch"
            out = []
            for g, cache in zip(self.groups, self.caches):
                pos = input_pos[g.start:g.stop] if input_pos.ndim == 2 else input_pos
                out.append(cache(q[g.start:g.stop], k[g.start:g.stop], v[g.start:g.stop], pos, rope_cos, rope_sin))
            return torch.cat(out)
        # A prefill chunk feeds rows of one group (the engine prefills each group's requests apart).
        i = self.group_of(int(rows[0]))
        return self.caches[i](q, k, v, input_pos, rope_cos, rope_sin, rows - self.groups[i].start)

    def reset(self, rows: Optional[Tensor] = None):
        wanted = None if rows is None else set(rows.tolist())
        for g, cache in zip(self.groups, self.caches):
            if wanted is None:
                cache.reset()
                continue
            local = [row - g.start for row in sorted(wanted) if g.start <= row < g.stop]
            if local:
                cache.reset(torch.tensor(local, device=rows.device))

    def finish(self, finished: Tensor):
        for g, cache in zip(self.groups, self.caches):
            cache.finish(finished[g.start:g.stop])

    def nbytes(self) -> int:
        return sum(cache.nbytes() for cache in self.caches)

    def pool_nbytes(self) -> int:
        return sum(cache.pool_nbytes() for cache in self.caches)


class RoutedPool:
    """The groups' block pools behind BlockPool's host API (reserve, share_prefix, publish_prefix, sharable), in the
    batch's row numbers, for the prefill and decode bookkeeping that does not know about groups."""

    def __init__(self, groups: list[RowGroup]):
        self.groups = groups

    def _at(self, row: int):
        g = next(g for g in self.groups if g.start <= row < g.stop)
        return g.pool, g.local(row)

    def reserve(self, row: int, length: int):
        pool, local = self._at(row)
        if pool is not None:
            pool.reserve(local, length)

    def sharable(self, row: int) -> bool:
        pool, _ = self._at(row)
        return pool is not None and pool.sharable(row)

    def share_prefix(self, row: int, tokens: list[int]) -> int:
        pool, local = self._at(row)
        return pool.share_prefix(local, tokens) if pool is not None else 0

    def publish_prefix(self, row: int, tokens: list[int]):
        pool, local = self._at(row)
        if pool is not None:
            pool.publish_prefix(local, tokens)
