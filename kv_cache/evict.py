"""Eviction under a fixed budget, the machinery every eviction policy shares (kv_cache/snapkv.py, h2o.py, tova.py):
a policy only says how tokens are scored; this file keeps the tokens, evicts the lowest-scored ones and frees what
it evicts (constant memory, contiguous or paged).

A sequence keeps at most --budget tokens per KV head:
  * the first sink_size tokens and the most recent window_size ones in the model dtype, the recent store (a
    RingStore shared by the heads, as compress_kv's), never evicted;
  * older_size = budget - sink_size - window_size older tokens that each KV head chooses by its policy's scores, in
    the per-head older store (layout: kv_cache/stores.py): the model dtype (DenseOlderStore) or, with --then_bits,
    quantized per token (QuantizedStore: int8 / fp8 per token, KIVI int4 / int2 values and keys per token in channel
    groups; KIVI's per-channel keys need groups of consecutive tokens, which eviction breaks). Each token's
    position and score sit beside it (older_pos, older_score).

Where each head's tokens sit: head h holds n_older[b, h] tokens of the lanes' run (stores.py: the H lanes' first
older_size slots seen as one run of H x older_size tokens), from older_start[b, h] on, with room for
older_room[b, h]. With --head_budget uniform (and under adaptive until a prompt overflows a head's share) head h's
run is its own lane: start h x older_size, room older_size, every head holding as many. With --head_budget adaptive
(AdaKV, Feng et al., 2024) a prefill whose candidates overflow a head's share chooses the layer's best
H x older_size tokens across its heads by score, each head keeping at least its best floor_size (AdaKV's safeguard),
and packs each head's choice into consecutive runs: a head may hold several lanes' worth and another a few tokens,
in the same bytes (the sum is allocated, not heads x the most one head may keep). Decoding then replaces within
each head's run. The fused kernel reads each head's run by its start and count (older_start); the PyTorch path
gathers it.

Keys are rotated at their absolute positions before they are stored (as full, quantize_kv), so an older token needs
no re-rotation wherever it sits; attention reads the ring as the recent store (slots 0 .. min(p, S + W - 1)) and
each head's run of the older store, and the fused kernel returns every token's attention probability with
the output (kernels/decode_attention.py return_scores), from which the policy updates the scores: no second pass
over keys.

Decode (static shapes, no host sync; one token per sequence at its own position p): the token leaving the window
(position p - W, in the ring slot p overwrites) moves into its head's run while it has room; when the run is full,
it replaces the head's lowest-scored token there if it scores higher (policy.replaces), else it is dropped (written
to the head's scratch slot). Then p is stored in the ring, attention runs, and the policy folds this step's probabilities
into the scores of every stored token (policy.update), with --decode_kernel_size first averaged over neighbouring
held tokens as the prompt's are (pooled_step).

Prefill (a chunk of T tokens at the same positions in each row it feeds): the chunk attends to what the cache holds
plus itself causally in full precision (SDPA); the policy scores every held and new token from the attention of
the queries it names (policy.score_queries), averaged over --kernel_size neighbouring positions (SnapKV's pooling,
every policy's default); sinks and the last window_size tokens go to the ring, and each head
keeps the best-scored min(older_size, candidates) of the rest (adaptive: the heads' best, above), compacted into
its run in position order (tokens already in the older store are copied in their stored form, not quantized
twice). A policy that needs the whole prompt in view
(SnapKV's observation window is the prompt's end) asks for it with whole_prompt: the engine then prefills it in one
chunk (runner.py).

Sizing: a budget at least the tokens a sequence ever holds (max_seq_length) never evicts, and would allocate up to
budget / max_seq_length times the full cache (26x for a 10-token run at the default 256): the cache is then the full
cache (as compress_kv's Sizing), a DenseStore of max_seq_length slots with full's forward, bytes and outputs. Paged,
the older store is cut into blocks taken as it fills (PageSpace below: every lane fills its first slots alike, and
adaptive runs are packed only into a store whose lanes are full) and the ring stays per sequence; what a sequence evicts is overwritten in its own blocks, which return to the pool when it ends.
"""
import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from kernels.formats import FORMATS, get_format
from kv_cache.base import (GROUP_SIZE, KVCache, SinkWindowOptions, attend, attention_probs, option, per_kv_head,
                           rotate_qk)
from kv_cache.paging import PageSpace, round_up
from kv_cache.rotation import RotateOptions, register_rotation, rotate_in, rotate_out
from kv_cache.stores import DenseOlderStore, DenseStore, PlaneStore, QuantizedStore, RingStore, bytes_of, run_cells

# The kept tokens are quantized one at a time, keys per token as values: they arrive and leave singly, never in
# the runs of consecutive tokens that per-channel scales need.
K_GRANULARITY = "token"


@dataclass
class Chunk:
    """A prefill chunk as it came into the cache, for policies that score from the queries themselves: its queries
    before RoPE (R, n_head, T, D), the position after its last and the model's RoPE tables."""
    q: Tensor
    end: int
    rope_cos: Tensor
    rope_sin: Tensor


@dataclass
class EvictOptions(SinkWindowOptions, RotateOptions):
    budget: int = option(256, "tokens kept per sequence and KV head in all: sinks + window + the policy's choice")
    then_bits: Optional[str] = option(None, "store the tokens the policy keeps (beyond sinks and window) in this "
                                            "format: 8, 4, 2 or fp8 (default: the model dtype)",
                                      choices=list(FORMATS))
    group_size: int = option(GROUP_SIZE, "--then_bits 4/2: channels per scale (keys and values per token)")
    head_budget: str = option("uniform", "uniform: every KV head keeps the same number of tokens; adaptive: a layer's "
                                         "heads share their tokens, each keeping what its scores win against the "
                                         "others' (AdaKV), stored for real (with tensor parallel: the heads of a rank)",
                              choices=["uniform", "adaptive"])
    head_floor: float = option(0.2, "--head_budget adaptive: the share of an equal split every head keeps at least "
                                    "(AdaKV's safeguard)")
    fine_share: float = option(0.0, "--then_bits 2: the share of the kept tokens (beyond sinks and window) that keep "
                                    "4 bits, the best-scored; the rest keep 2 (mixed precision by score; 0: off)")
    # SnapKV's pooling, for every policy: a needle is a run of tokens (SmolLM2 spells numbers a digit a token,
    # Llama-3 up to 3 digits a token), and a policy that keeps tokens one score at a time keeps some of its digits
    # and drops the rest. 15, not SnapKV's 5-7: measured at 1k, 0.1x of full's bytes, int4 kept tokens (RULER
    # niah x3, docs/results.md "Pooling for every policy"): tova 23.3 -> 96.7, h2o 3.3 -> 23.3, expected_attention
    # 6.7 -> 16.7; snapkv 13.3 (kernel 5) -> 60.0 at 0.2x. 1: the papers' per-token scores.
    kernel_size: int = option(15, "the prompt's scores averaged over this many neighbouring positions (odd; "
                                  "SnapKV's pooling, so a kept token brings its context; 1: each token its own)")
    # A needle is read forward: the answer's next token is copied from the token after the one just read, so what a
    # kept token should bring is what follows it. At 4k and 0.05x, heads of layers 7-14 kept a needle's ": 65953"
    # and not its "370." with the centered kernel (outputs/results/cpu_goals005_4k_2026-12-06/kept.log).
    pooling: str = option("centered", "--kernel_size's window: centered (SnapKV's: the positions around a token) "
                                      "or forward (the positions up to it, so an attended token brings the "
                                      "kernel_size - 1 after it)", choices=["centered", "forward"])
    # While decoding, tova scores each held token by the step's attention alone, so a kept run of tokens loses the
    # members the query does not attend to; pooled as the prompt's, a token keeps its neighbours. Streamed at 0.1x
    # (outputs/results/cpu_ppl_decode_2026-12-06/): tova +6.2 % -> +1.9 % perplexity with 15, but h2o, which sums
    # every step's attention, +4.3 % -> +8.5 %: so 1 by default, 15 for tova.
    decode_kernel_size: int = option(1, "tova, h2o: each decode step's attention averaged over this many "
                                        "neighbouring held tokens (--pooling's window) before it updates the scores "
                                        "(odd; 1: each token its own, the papers')")

    def check(self, head_dim):
        super().check(head_dim)
        if not isinstance(self.budget, int) or self.budget <= self.sink_size + self.window_size:
            raise ValueError(f"--budget {self.budget} leaves no room beyond --sink_size {self.sink_size} + "
                             f"--window_size {self.window_size}: use --budget {self.sink_size + self.window_size + 1} "
                             "or more, or compress_kv for sinks + window alone")
        if not isinstance(self.kernel_size, int) or self.kernel_size < 1 or self.kernel_size % 2 == 0:
            raise ValueError(f"--kernel_size must be an odd whole number >= 1 (got {self.kernel_size})")
        if not isinstance(self.decode_kernel_size, int) or self.decode_kernel_size < 1 \
                or self.decode_kernel_size % 2 == 0:
            raise ValueError(f"--decode_kernel_size must be an odd whole number >= 1 (got {self.decode_kernel_size})")
        if not isinstance(self.head_floor, (int, float)) or not 0 <= self.head_floor <= 1:
            raise ValueError(f"--head_floor must be a share between 0 and 1 (got {self.head_floor}): e.g. 0.2")
        if self.rotates() and self.then_bits is None:
            raise ValueError(f"--rotate {self.rotate} rotates the tokens that are quantized: add --then_bits (e.g. 4 "
                             "or 2), or drop --rotate")
        if not isinstance(self.fine_share, (int, float)) or not 0 <= self.fine_share <= 1:
            raise ValueError(f"--fine_share must be a share between 0 and 1 (got {self.fine_share}): e.g. 0.25")
        if self.fine_share and (str(self.then_bits) != "2" or self.head_budget != "uniform"):
            raise ValueError("--fine_share keeps the best-scored tokens at 4 bits and the rest at 2: it needs "
                             "--then_bits 2 and --head_budget uniform")
        if self.fine_share and not 0 < self.fine_size <= PlaneStore.MAX_FINE:
            raise ValueError(f"--fine_share {self.fine_share} of the {self.older_size} tokens kept beyond sinks and "
                             f"window is {self.fine_size} tokens at 4 bits: it must be 1 to {PlaneStore.MAX_FINE} "
                             "(raise or lower --fine_share or --budget)")
        fmt = None if self.then_bits is None else get_format(self.then_bits)
        if fmt is not None and fmt.asymmetric and head_dim is not None:
            if head_dim % self.group_size or head_dim % fmt.per_byte:
                raise ValueError(f"--group_size {self.group_size} must divide head_dim {head_dim} for --then_bits "
                                 f"{self.then_bits}: use e.g. --group_size {math.gcd(self.group_size, head_dim)}")

    def derive(self, head_dim):
        super().derive(head_dim)
        self.format = None if self.then_bits is None else get_format(self.then_bits)

    @property
    def older_size(self) -> int:
        """Slots per head for the policy's choice (beyond sinks and window)."""
        return self.budget - self.sink_size - self.window_size

    @property
    def floor_size(self) -> int:
        """--head_budget adaptive: tokens every head keeps at least (when it has them)."""
        return int(self.head_floor * self.older_size)

    @property
    def fine_size(self) -> int:
        """--fine_share: tokens a head keeps at 4 bits, the share's whole tokens (0: every kept token in
        --then_bits' format)."""
        return int(self.fine_share * self.older_size)

    def n_older(self, length: int) -> int:
        """Tokens in the older store once a sequence has seen `length` tokens: every token past sinks + window, up to
        the room."""
        return min(self.older_size, max(0, length - self.sink_size - self.window_size))


def pooled_over_positions(attention: Tensor, pos: Tensor, k: int, forward: bool = False) -> Tensor:
    """attention (R, H, N) averaged over the k positions around each token (SnapKV's pooling: a token scored high
    brings its neighbours, e.g. every digit of a number spelt a digit a token), or with `forward` over the k up to
    it (a token scored high brings the k - 1 after it), in position order (held tokens sit in the cache in no
    particular order) and over held neighbours only; pos (R, H, N), -1 for an empty slot."""
    order = pos.argsort(-1)  # empty slots (-1, attention 0) first
    mass, held = attention.gather(2, order), (pos.gather(2, order) >= 0).to(attention.dtype)
    pad = (k - 1, 0) if forward else (k // 2, k // 2)
    window_sum = lambda x: F.avg_pool1d(F.pad(x, pad), k, stride=1)  # noqa: E731
    mean = window_sum(mass) / window_sum(held).clamp(min=1 / k)
    return mean.scatter(2, order, mean)


class EvictionCache(KVCache):
    """Base of the eviction policies: subclasses set name, help, Options and the scoring methods below."""

    Options = EvictOptions
    replaces = True  # when the older store is full, a token leaving the window may replace the lowest-scored one

    # ------------------------------------------------------------ the policy (override these)

    def score_queries(self, T: int) -> slice:
        """The queries of a T-token prefill chunk whose attention scores the tokens."""
        return slice(0, T)

    def prefill_scores(self, attention: Tensor, old: Tensor, pos: Tensor, first: int, end: int) -> Tensor:
        """Scores (R, H, N) of the N tokens a chunk sees, from the attention they received from the chunk
        (prompt_attention, pooled over --kernel_size positions) and their scores before the chunk, old (R, H, N) (0
        for the chunk's own); pos (R, H, N) their positions (-1: an empty slot), the chunk's first .. end - 1. By
        default the chunk's attention alone: the prompt's end chooses (snapkv, tova)."""
        return attention

    def update(self, scores: Tensor, probs: Tensor, pos: Tensor, now: Tensor) -> Tensor:
        """Scores after a decode step at position now (R, 1, 1) whose attention probabilities (per KV head) are
        probs, for the tokens at positions pos (scores' shape, -1: an empty slot)."""
        raise NotImplementedError

    def prompt_attention(self, q: Tensor, keys: Tensor, values: Tensor, mask: Tensor, chunk) -> Tensor:
        """What prefill_scores scores from, (R, H, N): by default the attention probabilities of the queries
        score_queries names, summed over those queries and each KV head's query heads (summed before the pooling,
        which is linear: pooling (R, H, Q, N) would cost Q times as much). q (R, n_head, T, D) as attended (rotated),
        keys and values (R, H, N, D) every token the chunk sees, mask (R, 1, T, N); chunk: the chunk's Chunk (its
        queries before RoPE and the RoPE tables), for a policy that scores from the queries themselves."""
        queries = self.score_queries(q.shape[2])
        return per_kv_head(attention_probs(q[:, :, queries], keys, mask[:, :, queries]).sum(2), self.n_kv_head)

    # ------------------------------------------------------------ storage

    @classmethod
    def holds_everything(cls, options, max_seq_length) -> bool:
        """The budget holds every token a run can have: nothing is ever evicted (Sizing above)."""
        return cls.Options.resolve(options, None).budget >= max_seq_length

    @classmethod
    def capacity(cls, options, max_seq_length):
        if cls.holds_everything(options, max_seq_length):
            return max_seq_length  # sized as the full cache: it cannot hold more
        return None  # constant memory: streams without end

    @classmethod
    def bytes_per_token(cls, options, n_kv_head, head_dim, dtype):
        """Bytes of one token of the older store in one layer and sequence: its stored form plus its score and
        position."""
        opts = cls.Options.resolve(options, head_dim)
        stored = (2 * head_dim * dtype.itemsize if opts.format is None else
                  PlaneStore.bytes_per_token(opts.group_size, head_dim, opts.fine_size / opts.older_size)
                  if opts.fine_size else
                  QuantizedStore.bytes_per_token(opts.format, opts.group_size, K_GRANULARITY, head_dim))
        return n_kv_head * (stored + 4 + 4)

    @classmethod
    def page_space(cls, options, max_seq_length, block_size):
        """Paged: the older store, in blocks taken as it fills, and one more logical block for the scratch slot
        (never reserved: the null block). The ring stays per sequence."""
        if cls.holds_everything(options, max_seq_length):
            return super().page_space(options, max_seq_length, block_size)
        opts = cls.Options.resolve(options, None)
        n_slots = round_up(opts.older_size, block_size) + block_size
        return PageSpace(block_size, n_slots, opts.n_older)

    def __init__(self, batch_size, max_seq_length, n_kv_head, head_dim, dtype, device, options=None, pool=None,
                 **option_values):
        super().__init__(batch_size, max_seq_length, n_kv_head, head_dim, dtype, device, options, pool,
                         **option_values)
        opts = self.opts
        self.sink_size, self.window_size, self.older_size = opts.sink_size, opts.window_size, opts.older_size
        self.as_full = self.holds_everything(opts, max_seq_length)
        if self.as_full:  # nothing to evict: exactly the full cache's storage, no scores
            self.store = DenseStore(batch_size, n_kv_head, max_seq_length, head_dim, dtype, device, pool)
            return
        self.ring = RingStore(batch_size, n_kv_head, self.sink_size, self.window_size, head_dim, dtype, device)
        self.fine_size = opts.fine_size
        if opts.format is None:
            self.older = DenseOlderStore(batch_size, n_kv_head, opts.older_size, head_dim, dtype, device, pool)
        elif self.fine_size:
            self.older = PlaneStore(batch_size, n_kv_head, opts.older_size, head_dim, self.fine_size,
                                    opts.group_size, device, pool)
        else:
            self.older = QuantizedStore(batch_size, n_kv_head, opts.older_size, head_dim, opts.format,
                                        opts.group_size, K_GRANULARITY, device, pool)
        self.adaptive = opts.head_budget == "adaptive"
        # q, k (and v) in, output out (kv_cache/rotation.py): scores are unchanged
        register_rotation(self, opts.applied_rotation(opts.format, head_dim), opts.applied_parts(K_GRANULARITY),
                          head_dim, dtype, device)
        n_ring, n_older_slots = self.ring.n_slots, self.older.n_slots
        self.register_buffer("ring_score", torch.zeros(batch_size, n_kv_head, n_ring, device=device))
        self.register_buffer("older_score", torch.zeros(batch_size, n_kv_head, n_older_slots, device=device))
        self.register_buffer("older_pos", torch.full((batch_size, n_kv_head, n_older_slots), -1, dtype=torch.int32,
                                                    device=device))
        # Head h holds n_older[b, h] tokens of the lanes' run (stores.py) from older_start[b, h] on, room for
        # older_room[b, h]: its own lane (start h * M, room M) until --head_budget adaptive shares them out.
        self.register_buffer("n_older", torch.zeros(batch_size, n_kv_head, dtype=torch.long, device=device))
        self.register_buffer("older_start", torch.zeros(batch_size, n_kv_head, dtype=torch.long, device=device))
        self.register_buffer("older_room", torch.zeros(batch_size, n_kv_head, dtype=torch.long, device=device))
        self.reset_runs(slice(None))

    def reset_runs(self, rows):
        """Every head of sequences `rows` back to its own lane, empty."""
        self.n_older[rows] = 0
        self.older_start[rows] = torch.arange(self.n_kv_head, device=self.n_older.device) * self.older_size
        self.older_room[rows] = self.older_size

    def reset(self, rows=None):
        super().reset(rows)
        if self.as_full:
            return
        rows = slice(None) if rows is None else rows
        self.ring_score[rows] = 0
        self.older_score[rows] = 0
        self.older_pos[rows] = -1
        self.reset_runs(rows)

    def cells(self, run: Tensor) -> Tensor:
        """Token `run` of the lanes' run -> its cell lane * n_slots + slot in a per-lane buffer seen flat."""
        return run_cells(run, self.older_size, self.older.n_slots)

    def scratch_cells(self) -> Tensor:
        """(H,): each head's scratch slot (past the store's capacity, where a dropped token is written) in its own
        lane, as a cell."""
        return torch.arange(self.n_kv_head, device=self.n_older.device) * self.older.n_slots + self.older.capacity

    def older_tokens(self, row: int) -> list[list[int]]:
        """Per KV head, the positions sequence `row` keeps beyond sinks and window, sorted (for tests and reports)."""
        pos = self.older_pos[row].flatten().tolist()
        return [sorted(pos[cell] for cell in self.cells(torch.arange(start, start + n)).tolist())
                for start, n in zip(self.older_start[row].tolist(), self.n_older[row].tolist())]

    # ------------------------------------------------------------ attention

    def forward(self, q, k, v, input_pos, rope_cos, rope_sin, rows=None):
        if self.as_full:
            return self.forward_full(self.store, q, k, v, input_pos, rope_cos, rope_sin, rows)
        decode = self.is_decode(q, rows)
        rows, pos = self.rows_and_positions(q, input_pos, rows)
        chunk = None if decode else Chunk(q, int(pos[0, -1]) + 1, rope_cos, rope_sin)
        q, k = rotate_qk(q, k, pos, rope_cos, rope_sin)
        q, k, v = rotate_in(self, q, k, v)
        out = self._decode(q, k, v, pos) if decode else self._prefill(q, k, v, pos, rows, chunk)
        return rotate_out(self, out)

    def _decode(self, q, k, v, pos):
        R, H, S, M = q.shape[0], self.n_kv_head, self.sink_size, self.older_size
        rows, ring = slice(0, R), self.ring
        slot = ring.slots(pos)  # (R, 1): the ring slot p takes, whose token (if older) leaves the window
        leaving_pos = ring.pos[:R].gather(1, slot)  # (R, 1), -1 while the ring fills
        leaves = (leaving_pos[:, 0] >= S) & (leaving_pos[:, 0] < pos[:, 0])  # a finished row repeats p: no move
        head_slot = slot[:, None, :].expand(R, H, 1)
        leaving_score = self.ring_score[:R].gather(2, head_slot)[..., 0]  # (R, H)
        n_older, start, room = self.n_older[:R], self.older_start[:R], self.older_room[:R]
        has_room = n_older < room
        # Each head's lowest-scored token in its run (its own lane's first M slots until adaptive shares them).
        run = torch.arange(H * M, device=q.device)
        in_run = (run >= start[..., None]) & (run < (start + room)[..., None])  # (R, H, H * M)
        run_score = self.older_score[:R, :, :M].reshape(R, 1, H * M)
        lowest, lowest_at = run_score.masked_fill(~in_run, float("inf")).min(-1)  # (R, H)
        replace = (leaving_score > lowest) if self.replaces else torch.zeros_like(lowest, dtype=torch.bool)
        n_slots, scratch = self.older.n_slots, self.scratch_cells()
        target = torch.where(has_room, self.cells(start + n_older),
                             torch.where(replace, self.cells(lowest_at), scratch))
        target = torch.where(leaves[:, None], target, scratch)  # (R, H) cells
        low_plane = {}  # mixed precision: the low-plane entry it takes, if any (chosen before anything moves)
        if self.fine_size:
            low_plane["low_entry"] = self.fine_entries(target % n_slots, leaves[:, None] & (has_room | replace),
                                                       leaving_score)[..., None]
        self.older.write_heads(rows, (target % n_slots)[..., None], *ring.read(rows, slot),
                               lanes=(target // n_slots)[..., None] if self.adaptive else None, **low_plane)
        self.older_pos[:R].view(R, -1).scatter_(1, target, leaving_pos.expand(R, H).int())
        self.older_score[:R].view(R, -1).scatter_(1, target, leaving_score)
        self.n_older[:R] += leaves[:, None] & has_room
        ring.write_positions(rows, pos, k, v)
        self.ring_score[:R].scatter_(2, head_slot, 0.0)
        recent_last = pos[:, 0].clamp(max=ring.n_slots - 1)  # the ring fills slots 0, 1, ... in order, then wraps
        # uniform: every head holds as many (its lane's first n_older), one count a sequence as quantize_kv's
        out, probs = self.attend_decode(q, ring, recent_last=recent_last, older=self.older, scores=True, older_read=M,
                                        n_older=self.n_older[:R] if self.adaptive else self.n_older[:R, 0],
                                        older_start=self.older_start[:R] if self.adaptive else None)
        if self.opts.decode_kernel_size > 1:
            probs = self.pooled_step(probs)
        now = pos[:, :, None]  # positions as stored (views, no copy a step: only h2o's mean reads them)
        self.older_score[:R] = self.update(self.older_score[:R], probs[..., :n_slots], self.older_pos[:R], now)
        self.ring_score[:R] = self.update(self.ring_score[:R], probs[..., n_slots:], self.ring.pos[:R, None, :], now)
        return out

    def pooled_step(self, probs: Tensor) -> Tensor:
        """--decode_kernel_size: a decode step's probabilities (R, H, older slots + ring slots) averaged over that
        many neighbouring held tokens of each head in position order (pooled_over_positions, as the prompt's). The
        older columns are cells (a slot of a lane, base.attend_decode), and head h holds those of its run
        (older_start, n_older): under uniform budgets its own lane's first n_older slots, pooled in place; under
        adaptive any lane's, so every head looks for its run in every lane's first older_size slots (H x the
        columns). Each held cell takes its head's pooled value; the rest (the scratch slot, empty slots) 0, as
        unpooled."""
        R, H, M, n_slots = probs.shape[0], self.n_kv_head, self.older_size, self.older.n_slots
        ring_pos = self.ring.pos[:R].long()[:, None, :].expand(R, H, -1)
        if not self.adaptive:
            held = torch.arange(n_slots, device=probs.device) < self.n_older[:R, :, None]
            return self.pooled_held(probs, held, self.older_pos[:R], ring_pos)
        run = torch.arange(H * M, device=probs.device).expand(H, -1)  # (H, H * M): the run tokens each head scans
        held = (run >= self.older_start[:R, :, None]) & (run < (self.older_start + self.n_older)[:R, :, None])
        cells = self.cells(run).expand(R, -1, -1).flatten(1)
        by_run = lambda x: x.reshape(R, -1).gather(1, cells).view(R, H, H * M)  # noqa: E731  cells -> run tokens
        pooled = self.pooled_held(torch.cat([by_run(probs[..., :n_slots]), probs[..., n_slots:]], dim=2), held,
                                  by_run(self.older_pos[:R]), ring_pos)
        older = torch.zeros(R, H * n_slots, dtype=probs.dtype, device=probs.device).scatter_add_(
            1, cells, pooled[..., :H * M].flatten(1))  # one head at most holds a cell
        return torch.cat([older.view(R, H, n_slots), pooled[..., H * M:]], dim=2)

    def pooled_held(self, probs: Tensor, held: Tensor, older_pos: Tensor, ring_pos: Tensor) -> Tensor:
        """pooled_step over columns (R, H, older columns + ring slots): the older columns each head holds (held), at
        older_pos, and the ring's; what a head does not hold neither gives (its mass, another head's) nor gets."""
        pos = torch.cat([older_pos.long().masked_fill(~held, -1), ring_pos], dim=2)
        not_held = pos < 0
        pooled = pooled_over_positions(probs.masked_fill(not_held, 0.0), pos, self.opts.decode_kernel_size,
                                       forward=self.opts.pooling == "forward")
        return pooled.masked_fill(not_held, 0.0)

    def fine_entries(self, slots: Tensor, kept: Tensor, score: Tensor) -> Tensor:
        """--fine_share, a decode step: the low-plane entry (R, H) (-1: none) of the token leaving the window, kept
        (R, H) in slot `slots` (R, H) of its head with `score` (R, H). It takes the entry of the token it replaces,
        else a free entry, else the entry of the head's lowest-scored fine token if it scores higher, which is
        demoted to 2 bits here (its entry forgotten); else it is kept at 2 bits."""
        R, M = slots.shape[0], self.older_size
        entry_of = self.older.low_entry[:R]  # each slot's low-plane entry
        held = torch.arange(M, device=slots.device) < self.n_older[:R, :, None]  # stale entries past n_older
        is_fine = held & (entry_of[..., :M] >= 0)
        replaced = torch.where(slots < self.n_older[:R], entry_of.gather(2, slots[..., None])[..., 0], -1).long()
        lowest, lowest_at = self.older_score[:R, :, :M].masked_fill(~is_fine, float("inf")).min(-1)
        n_fine = is_fine.sum(-1)
        demote = kept & (replaced < 0) & (n_fine >= self.fine_size) & (score > lowest)
        entry = torch.where(replaced >= 0, replaced, torch.where(n_fine < self.fine_size, n_fine, torch.where(
            demote, entry_of.gather(2, lowest_at[..., None])[..., 0].long(), -1)))
        # the demoted token forgets its entry (the others write the scratch slot's)
        entry_of.scatter_(2, torch.where(demote, lowest_at, self.older.capacity)[..., None], -1)
        return torch.where(kept, entry, -1)

    def _prefill(self, q, k, v, pos, rows, chunk):
        R, H, T = q.shape[0], self.n_kv_head, q.shape[2]
        S, W, M, first = self.sink_size, self.window_size, self.older_size, int(pos[0, 0])
        end = first + T
        dev = q.device
        # What each head holds in the older store, in its run's order: (R, H, L), L the most any head holds.
        n_held, start = self.n_older[rows], self.older_start[rows]
        L = int(n_held.max()) if n_held.numel() else 0
        held_older = torch.arange(L, device=dev) < n_held[..., None]
        run = (start[..., None] + torch.arange(L, device=dev)).clamp(max=H * M - 1)
        cells = self.cells(run).flatten(1)  # (R, H * L)
        of_runs = lambda x: x.reshape(R, 1, H * M, *x.shape[3:]).expand(R, H, -1, *x.shape[3:]).gather(  # noqa: E731
            2, run.view(R, H, L, *[1] * (x.dim() - 3)).expand(R, H, L, *x.shape[3:]))
        if L:
            older_k, older_v = (of_runs(x) for x in self.older.dequantize(rows, M, self.dtype))
        else:
            older_k = older_v = k.new_zeros(R, H, 0, k.shape[3])
        ring_k, ring_v = self.ring.logical(rows)
        ring_pos = self.ring.pos[rows]
        keys, values = torch.cat([older_k, ring_k, k], dim=2), torch.cat([older_v, ring_v, v], dim=2)
        # Every token the chunk sees: older (per head), ring, chunk; positions (R, H, N), -1 for empty slots.
        chunk_pos = pos[:, None, :].expand(R, H, T)
        older_pos = self.older_pos[rows].view(R, -1).gather(1, cells).view(R, H, L).long().masked_fill(~held_older, -1)
        all_pos = torch.cat([older_pos, ring_pos[:, None, :].expand(R, H, -1), chunk_pos], dim=2)
        if bool((n_held == n_held[:, :1]).all()):  # every head holds as many: one mask for all heads
            held = torch.ones(R, 1, T, L + ring_pos.shape[1], dtype=torch.bool, device=dev)
            held[..., L:] = (ring_pos >= 0)[:, None, None, :]
            held[..., :L] = held_older[:, :1, None, :]
        else:  # a mask per query head (a chunk after --head_budget adaptive shared the older tokens out)
            held = torch.cat([held_older[:, :, None, :].expand(R, H, T, L),
                              (ring_pos >= 0)[:, None, None, :].expand(R, H, T, -1)], dim=3)
            held = held.repeat_interleave(q.shape[1] // H, dim=1)
        causal = torch.ones(T, T, dtype=torch.bool, device=dev).tril().expand(R, held.shape[1], T, T)
        mask = torch.cat([held, causal], -1)
        out = attend(q, keys, values, mask)
        attention = self.prompt_attention(q, keys, values, mask, chunk)  # (R, H, N)
        if self.opts.kernel_size > 1:
            attention = pooled_over_positions(attention, all_pos, self.opts.kernel_size,
                                              forward=self.opts.pooling == "forward")
        old_scores = self.older_score[rows].view(R, -1).gather(1, cells).view(R, H, L).masked_fill(~held_older, 0.0)
        old = torch.cat([old_scores, self.ring_score[rows], torch.zeros(R, H, T, device=dev)], dim=2)
        scores = self.prefill_scores(attention, old, all_pos, first, end)
        in_ring = (all_pos >= 0) & ((all_pos < S) | (all_pos >= end - W))
        # Tokens in position order (a stable sort), so ties in score go to the earlier position and the choice never
        # depends on the layout (heads per rank, paging, where tokens sit in the cache).
        by_pos = all_pos.argsort(dim=-1, stable=True)
        candidate = (all_pos >= S) & (all_pos < end - W)
        chosen, packed = self.choose(scores.gather(2, by_pos), candidate.gather(2, by_pos))
        # The chosen tokens go to their heads' runs in position order, in their stored form: the older store's as
        # they are, the ring's and the chunk's quantized now (a token is quantized once). The rest go to each
        # head's scratch slot.
        n_new = chosen.sum(-1)  # (R, H)
        own_lane = torch.arange(H, device=dev) * M
        new_start = torch.where(packed[:, None], n_new.cumsum(-1) - n_new, own_lane)
        n_slots = self.older.n_slots
        target = torch.where(chosen, self.cells(new_start[..., None] + chosen.cumsum(-1) - 1),
                             self.scratch_cells()[:, None])  # (R, H, N)
        stored = {name: of_runs(bytes_of(x)) for name, x in self.older.raw(rows, M).items()} if L else None
        fresh = self.older.encode(torch.cat([ring_k, k], dim=2), torch.cat([ring_v, v], dim=2))
        fresh = {name: bytes_of(x) for name, x in fresh.items()}  # fp8 codes move as bytes (no float8 gather)
        fields = {name: (x if stored is None else torch.cat([stored[name], x], dim=2)).gather(
            2, by_pos.view(*by_pos.shape, *[1] * (x.dim() - 3)).expand(*by_pos.shape, *x.shape[3:]))
            for name, x in fresh.items()}
        if self.fine_size:  # the best-scored fine_size of the chosen that have their low plane, entries in order
            has_low = fields["low_entry"] >= 0
            ranked = scores.gather(2, by_pos).masked_fill(~(chosen & has_low), float("-inf"))
            fine = chosen & has_low & (ranks(ranked) < self.fine_size)
            fields["low_entry"] = torch.where(fine, fine.cumsum(-1) - 1, -1)
        self.older.write_heads_buf(fields, rows, target % n_slots, lanes=target // n_slots if self.adaptive else None)
        for buf, x in ((self.older_pos, all_pos.int()), (self.older_score, scores)):
            part = buf[rows]
            part.view(R, -1).scatter_(1, target.flatten(1), x.gather(2, by_pos).flatten(1))
            buf[rows] = part
        self.n_older[rows] = n_new
        self.older_start[rows] = new_start
        self.older_room[rows] = torch.where(packed[:, None], n_new, M)
        # The ring keeps sinks and the last W tokens: the chunk's are stored, and every ring token gets its score.
        idx = ((pos[0] < S) | (pos[0] >= end - W)).nonzero().squeeze(1)
        self.ring.write_positions(rows, pos[:, idx], k[:, :, idx], v[:, :, idx])
        ring_scores = scores.masked_fill(~in_ring, 0.0)
        ring_slot = self.ring.slots(all_pos.clamp(min=0)).masked_fill(~in_ring, self.ring.n_slots)
        new_ring_score = torch.zeros(R, H, self.ring.n_slots + 1, device=dev)
        self.ring_score[rows] = new_ring_score.scatter_add_(2, ring_slot, ring_scores)[..., :-1]
        return out

    def choose(self, scores: Tensor, candidate: Tensor) -> tuple[Tensor, Tensor]:
        """Which of the tokens (R, H, N), in position order, with scores and candidate (R, H, N) the older store
        keeps, and which rows (R,) have their heads' runs packed out of their lanes. uniform: each head its best M.
        adaptive (AdaKV): when some head has more candidates than M, the heads' best H * M in all, each head keeping
        at least its best floor_size; else every candidate. Ties within a head go to the earlier position, across
        heads to the lower head."""
        R, H, N = scores.shape
        M = self.older_size
        ranked = scores.masked_fill(~candidate, float("-inf"))
        rank = ranks(ranked)
        chosen = candidate & (rank < M)
        packed = torch.zeros(R, dtype=torch.bool, device=scores.device)
        if self.adaptive:
            packed = (candidate.sum(-1) > M).any(-1)
            floor = candidate & (rank < self.opts.floor_size)
            rest = candidate & ~floor
            left = H * M - floor.sum((1, 2))  # (R,)
            overall = ranks(ranked.masked_fill(~rest, float("-inf")).flatten(1)).view(R, H, N)
            chosen = torch.where(packed[:, None, None], floor | (rest & (overall < left[:, None, None])), chosen)
        return chosen, packed


def ranks(x: Tensor) -> Tensor:
    """Each entry's place (0: the highest) in its last dim sorted in descending order, ties to the earlier entry."""
    order = x.sort(dim=-1, descending=True, stable=True).indices
    return torch.empty_like(order).scatter_(-1, order, torch.arange(x.shape[-1], device=x.device).expand_as(order))
