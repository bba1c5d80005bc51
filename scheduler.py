"""Continuous batching's decisions, on the host: which request runs in which cache row, and when.

The cache's batch rows are slots that requests take and give back, in groups: each KV configuration owns a range
of rows (one group of every row, except in a mixed batch: kv_cache/mixed.py) and, paged, a block pool
(kv_cache/paging.py). A request waits until a row of its group is free and, paged, until the free blocks cover its
worst case (prompt + max_new_tokens) on top of what the group's running requests may still take. So a running
request never finds the pool empty: no preemption, no recomputation (vLLM admits optimistically and preempts
instead); a request that ends early at a stop token returns its blocks early, and the next admission uses them. A
request whose worst case exceeds the whole pool, or whose prompt + max_new_tokens exceed what a row holds, can never
run: check_fits refuses it at once.

Admission is first come, first served within a group: its head waits for room rather than being overtaken, so a
long request is never starved by short ones. Nothing here touches the model: the engine (engine.py) prefills what
admit() returns and runs the decode step over every row.
"""
from collections import deque
from dataclasses import dataclass, field

from kv_cache.paging import RowGroup


@dataclass
class SamplingParams:
    """How one request generates: up to max_new_tokens, ending early at any of stop_ids (kept in its tokens);
    temperature 0 is greedy; top_k 0 and top_p 1 restrict nothing; seed None takes the engine's next one."""
    max_new_tokens: int = 200
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = None
    stop_ids: tuple = ()

    def check(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = no top-k), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


@dataclass
class Request:
    id: int
    prompt: list
    params: SamplingParams
    seed: int
    group: str = None  # its KV configuration (None: the batch's first)
    tokens: list = field(default_factory=list)  # generated so far
    row: int = None  # its cache row while it runs
    shared_tokens: int = 0  # prompt tokens taken from the pool's blocks instead of computed
    finish_reason: str = None  # "stop", "length" or "abort" once it ended

    @property
    def position(self) -> int:
        """Where its next token goes."""
        return len(self.prompt) + len(self.tokens) - 1


def tokens_stored(prompt_len: int, max_new_tokens: int) -> int:
    """Tokens a request writes into its cache row at most: the last new token is sampled, never fed back."""
    return prompt_len + max_new_tokens - 1


class Scheduler:
    def __init__(self, groups: list[RowGroup]):
        """groups: the batch's rows by KV configuration (KVCache.row_groups), each with the tokens a row holds."""
        self.groups = {g.name: g for g in groups}
        self.default = groups[0].name
        self.waiting = {g.name: deque() for g in groups}
        self.free_rows = {g.name: list(range(g.start, g.stop)) for g in groups}
        self.running: dict[int, Request] = {}  # row -> request
        self.peak_running = 0

    def group(self, request: Request) -> RowGroup:
        return self.groups[self.default if request.group is None else request.group]

    def worst_case_blocks(self, request: Request) -> int:
        pool = self.group(request).pool
        if pool is None:
            return 0
        return pool.space.blocks_for(tokens_stored(len(request.prompt), request.params.max_new_tokens))

    def check_fits(self, request: Request, name: str = "the prompt"):
        """A one-line ValueError when the request can never run, whatever else is running."""
        if request.group is not None and request.group not in self.groups:
            raise ValueError(f"unknown KV configuration {request.group!r}: choose one of {', '.join(self.groups)}")
        group = self.group(request)
        total = len(request.prompt) + request.params.max_new_tokens
        if group.capacity is not None and total > group.capacity:
            raise ValueError(f"{name} ({len(request.prompt)} tokens) + max_new_tokens ({request.params.max_new_tokens})"
                             f" = {total} tokens but a sequence holds {group.capacity}: shorten the prompt, lower "
                             "max_new_tokens or raise --max_seq_length")
        need = self.worst_case_blocks(request)
        if group.pool is not None and need > group.pool.usable:
            raise ValueError(f"{name} ({len(request.prompt)} tokens) + max_new_tokens "
                             f"{request.params.max_new_tokens} needs {need} blocks of {group.pool.block_tokens} tokens"
                             f" but the pool has {group.pool.usable}: raise --num_blocks / --kv_memory_gb, or lower "
                             "max_new_tokens")

    def add(self, request: Request):
        """Queue a request that check_fits let through."""
        self.waiting[self.group(request).name].append(request)

    def promised_blocks(self, group: RowGroup) -> int:
        """Blocks the group's running requests may still take."""
        return sum(self.worst_case_blocks(r) - len(group.pool.held[group.local(row)])
                   for row, r in self.running.items() if group.start <= row < group.stop)

    def admit(self) -> list[Request]:
        """The waiting requests that start now, each given a row (per group in arrival order, its head first)."""
        admitted = []
        for name, waiting in self.waiting.items():
            group, free = self.groups[name], self.free_rows[name]
            while waiting and free:
                request = waiting[0]
                if group.pool is not None and (self.worst_case_blocks(request) >
                                               group.pool.available - self.promised_blocks(group)):
                    break  # wait for blocks: a running request ends within max_new_tokens steps
                waiting.popleft()
                request.row = free.pop(0)
                self.running[request.row] = request
                admitted.append(request)
        self.peak_running = max(self.peak_running, len(self.running))
        return admitted

    def reserve_decode(self):
        """Before a decode step: the blocks of every running request's next token."""
        for row, request in self.running.items():
            group = self.group(request)
            if group.pool is not None:
                group.pool.reserve(group.local(row), request.position + 1)

    def finish(self, request: Request, reason: str):
        """Request ended: its row is free again (the engine resets the row's cache, which returns its blocks)."""
        request.finish_reason = reason
        if request.row is not None and self.running.get(request.row) is request:
            del self.running[request.row]
            self.free_rows[self.group(request).name].append(request.row)

    def find(self, request_id: int) -> Request:
        for request in [*self.running.values(), *(r for w in self.waiting.values() for r in w)]:
            if request.id == request_id:
                return request
        return None

    def remove_waiting(self, request: Request):
        self.waiting[self.group(request).name].remove(request)

    def has_unfinished(self) -> bool:
        return bool(self.running) or any(self.waiting.values())
