"""Paged KV storage (vLLM's PagedAttention): one pool of fixed-size blocks shared by every sequence of the batch.

Each strategy pages one store, the one that grows with the sequence (full: its DenseStore; compress_kv: its ring;
quantize_kv and the eviction policies: their older store, payload, scales and zero-points paged together — the
16-bit sinks and window stay per sequence). A sequence's slots of that store are logical; the block table maps
logical block i of sequence b to a physical block of the pool (the physical slot of a logical one:
kv_cache/stores.py, Paged; the fused kernel reads through the same table).

One block table for all layers: every layer stores the same tokens of a sequence in the same logical slots, so one
allocation decision per block serves all layers (each layer has its own pool buffers, indexed by the same block
numbers). Block numbers therefore mean "this block in every layer": the pool's bytes per block are summed over
layers. Block 0 is the null block, never handed out: table entries not in use point to it, so writes of finished or
empty rows (the static decode step writes every row) and the quantized store's scratch group land there harmlessly.

The host side (this file) decides which blocks a sequence holds, outside the compiled decode step: before a prefill
chunk or a decode step the generation loop calls reserve(row, length), which takes blocks on demand; a sequence's
blocks return when it is reset. The device table has a fixed shape (batch, max_blocks), so the decode step compiles
to one graph however the table's contents change.

Prefix sharing (stores where slot = position, i.e. full): a full block of prompt tokens is a function of the tokens
up to its end, so sequences whose prompts start with the same blocks map them to the same physical block,
reference-counted. A shared block is always full and never written again (a sequence writes only past what it
shares, and the last prompt token is always recomputed), so no block ever needs copying: copy-on-write reduces to
"the first block that differs, or is not full, is the sequence's own". When its last holder ends, a prompt block
stays in the index as a cached block (vLLM's automatic prefix caching): the next sequence with that prefix — the
next --num_samples run of one prompt, a retried request — takes it back without recomputing it, and a cached block
is handed out again (its index entry dropped), least recently released first, only when no free block is left.
"""
from collections import OrderedDict
import hashlib
from dataclasses import dataclass
from typing import Callable

import torch

NULL_BLOCK = 0
DEFAULT_BLOCK_SIZE = 16  # tokens per block (vLLM's default too): --block_size, the GPU suite's paged rows


@dataclass(frozen=True)
class PageSpace:
    """How a strategy's paged store is cut into blocks (KVCache.page_space)."""
    block_tokens: int  # slots per block
    n_slots: int  # logical slots of one sequence: the store's capacity (a whole number of blocks)
    slots_used: Callable[[int], int]  # slots a sequence of n tokens has filled (in order, from slot 0)
    sharable: bool = False  # slot = position: prompt blocks can be shared between sequences

    @property
    def max_blocks(self) -> int:
        return self.n_slots // self.block_tokens

    def blocks_for(self, length: int) -> int:
        """Blocks a sequence of `length` tokens holds."""
        return -(-self.slots_used(length) // self.block_tokens)


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


@dataclass(frozen=True)
class RowGroup:
    """Rows start..stop-1 of a batch that share one KV configuration: their pool (None: contiguous; its rows are
    numbered from 0 at start) and the tokens a row holds (None: it streams without end)."""
    name: str
    start: int
    stop: int
    pool: "BlockPool" = None
    capacity: int = None

    def local(self, row: int) -> int:
        return row - self.start


class PoolExhausted(RuntimeError):
    pass


class BlockPool:
    """Which physical blocks each sequence (row) holds, their reference counts, the prefix index and the device
    block table (batch, max_blocks) int32 that every layer's paged store reads."""

    def __init__(self, num_blocks: int, space: PageSpace, batch_size: int, device):
        if num_blocks < 2:
            raise ValueError(f"a pool of {num_blocks} block(s) holds nothing (block 0 is the null block): use "
                             "--num_blocks 2 or more, or a larger --kv_memory_gb")
        self.num_blocks, self.space, self.block_tokens = num_blocks, space, space.block_tokens
        self.table = torch.full((batch_size, space.max_blocks), NULL_BLOCK, dtype=torch.int32, device=device)
        self.free = list(range(num_blocks - 1, NULL_BLOCK, -1))  # pop() hands out the lowest number first
        self.refs = [0] * num_blocks
        self.held = [[] for _ in range(batch_size)]  # per row: its blocks in logical order
        self.prefix_index: dict[bytes, int] = {}  # prefix key -> block holding the prefix's last block of tokens
        self.key_of: dict[int, bytes] = {}
        self.cached: OrderedDict[int, None] = OrderedDict()  # held by nobody, still indexed: oldest first
        self.peak_used = 0

    @property
    def usable(self) -> int:
        return self.num_blocks - 1

    @property
    def available(self) -> int:
        """Blocks a reservation can take: free ones, then cached prompt blocks."""
        return len(self.free) + len(self.cached)

    @property
    def used(self) -> int:
        """Blocks held by sequences."""
        return self.usable - self.available

    def _take(self) -> int:
        if self.free:
            return self.free.pop()
        block, _ = self.cached.popitem(last=False)  # the least recently released prompt block
        del self.prefix_index[self.key_of.pop(block)]
        return block

    def reserve(self, row: int, length: int):
        """Make sure sequence `row` holds the blocks of its first `length` tokens (taken on demand)."""
        held = self.held[row]
        need = self.space.blocks_for(length) - len(held)
        if need <= 0:
            return
        if need > self.available:
            raise PoolExhausted(f"the KV pool has {self.available} free block(s) but sequence {row} needs {need} "
                                f"more for {length} tokens: raise --num_blocks / --kv_memory_gb or lower "
                                "--max_batch_size")
        new = [self._take() for _ in range(need)]
        for block in new:
            self.refs[block] = 1
        self.table[row, len(held):len(held) + need] = torch.tensor(new, dtype=torch.int32)
        held.extend(new)
        self.peak_used = max(self.peak_used, self.used)

    def release(self, rows=None):
        """Return the blocks of sequences `rows` (all when None); shared blocks stay while another holds them, and
        indexed prompt blocks stay cached for a later sequence with the same prefix."""
        rows = range(len(self.held)) if rows is None else [int(r) for r in rows]
        for row in rows:
            if not self.held[row]:
                continue
            for block in self.held[row]:
                self.refs[block] -= 1
                if self.refs[block] == 0:
                    if block in self.key_of:
                        self.cached[block] = None
                    else:
                        self.free.append(block)
            self.held[row] = []
            self.table[row] = NULL_BLOCK

    def _prefix_keys(self, tokens: list[int], n_blocks: int):
        """One key per full block of tokens: a hash chained over every token up to the block's end."""
        key = b""
        bt = self.block_tokens
        for i in range(n_blocks):
            key = hashlib.sha256(key + repr(tokens[i * bt:(i + 1) * bt]).encode()).digest()
            yield key

    def sharable(self, row: int) -> bool:
        """Whether sequence `row`'s prompt blocks can be shared (the same for every row of one pool)."""
        return self.space.sharable

    def share_prefix(self, row: int, tokens: list[int]) -> int:
        """Map the first blocks of sequence `row` (holding nothing yet) onto blocks that already hold the same
        prompt prefix; return the number of tokens shared. The block of the last prompt token is never shared:
        its logits must be computed."""
        if not self.space.sharable or self.held[row]:
            return 0
        shared = []
        for key in self._prefix_keys(tokens, (len(tokens) - 1) // self.block_tokens):
            block = self.prefix_index.get(key)
            if block is None:
                break
            shared.append(block)
        for block in shared:
            self.cached.pop(block, None)  # a cached block comes back into use
            self.refs[block] += 1
        if shared:
            self.table[row, :len(shared)] = torch.tensor(shared, dtype=torch.int32)
        self.held[row] = shared
        return len(shared) * self.block_tokens

    def publish_prefix(self, row: int, tokens: list[int]):
        """After sequence `row`'s prompt is stored: its full prompt blocks become sharable."""
        if not self.space.sharable:
            return
        n_full = min(len(tokens) // self.block_tokens, len(self.held[row]))
        for key, block in zip(self._prefix_keys(tokens, n_full), self.held[row]):
            if key not in self.prefix_index and block not in self.key_of:
                self.prefix_index[key] = block
                self.key_of[block] = key

    def check(self):
        """Raise AssertionError when the accounting is inconsistent (tests: no leak, no double use)."""
        holders = [0] * self.num_blocks
        for row, blocks in enumerate(self.held):
            for i, block in enumerate(blocks):
                holders[block] += 1
                assert int(self.table[row, i]) == block, f"row {row} logical block {i}: table disagrees"
            assert all(int(b) == NULL_BLOCK for b in self.table[row, len(blocks):]), f"row {row}: stale entries"
        assert NULL_BLOCK not in self.free and NULL_BLOCK not in self.cached and holders[NULL_BLOCK] == 0, \
            "the null block was handed out"
        free = set(self.free)
        assert len(free) == len(self.free), "a block is free twice"
        assert not free & set(self.cached), "a block is both free and cached"
        for block in range(1, self.num_blocks):
            assert holders[block] == self.refs[block], f"block {block}: {holders[block]} holders, {self.refs[block]} refs"
            idle = block in free or block in self.cached
            assert idle == (holders[block] == 0), f"block {block}: idle and held, or leaked"
        assert all(block in self.key_of for block in self.cached), "a cached block is not indexed"
        assert {b: k for k, b in self.prefix_index.items()} == self.key_of, "the prefix index and its inverse differ"
        assert all(block not in free for block in self.key_of), "the prefix index names a free block"

