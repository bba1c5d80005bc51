"""Decode attention over quantize_kv's quantized older store on the CPU, without dequantizing it: a small C kernel
(kernels/cpu_attention.c) reads the stored codes directly, so a quantized cache reads fewer bytes than the full
cache's float32 one. The CPU counterpart of kernels/decode_attention.py's older loop. Eager quantize_kv steps run
through DecodeStep: the flush, the ring write and the attention in one call whose arguments are checked and laid out
once per cache.

The C file is compiled on first use (cc -O3 -march=native -fopenmp) into a cache folder, $KVCACHE_CACHE or
~/.cache/kvcache/cpu_attention/, under a name keyed by the source, the compiler's version and this CPU's flags: home
folders shared across node types (a Slurm cluster) never run -march=native code built for another CPU. The build goes
to a temporary name and is renamed into place, so processes building at once are safe. available() says whether it
can be built here (a C compiler with OpenMP); callers keep the PyTorch path when it cannot.

Under torch.compile the kernel is the opaque op torch.ops.kvcache.older_attention (it traces with fullgraph=True).
"""
import ctypes
import hashlib
import os
import platform
import subprocess
import tempfile
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor

from kernels.formats import get_format, older_format

SOURCE = Path(__file__).with_suffix(".c")
# -fassociative-math (with the two flags it needs) lets gcc sum a dot product in vector lanes and reduce them once,
# instead of adding lane by lane in order: 1.6x faster overall. Not -ffast-math: its -ffinite-math-only would break the
# -inf of empty rows.
FLAGS = ["-O3", "-march=native", "-fopenmp", "-fassociative-math", "-fno-signed-zeros", "-fno-trapping-math",
         "-shared", "-fPIC"]
MAX_HEAD_DIM = 256

builds = 0  # compiles run by this process (the tests check that a second load reuses the cached library)
_lib = None  # the loaded library, once per process
_error = None  # why it could not be built or loaded, once per process (available() does not retry)


class _Buf(ctypes.Structure):  # buf_t in cpu_attention.c
    _fields_ = [("data", ctypes.c_void_p), ("sb", ctypes.c_int64), ("sh", ctypes.c_int64), ("st", ctypes.c_int64)]


class _Args(ctypes.Structure):  # args_t in cpu_attention.c
    _fields_ = ([(name, ctypes.c_int32) for name in ("B", "H", "G", "D", "bits", "fp8", "k_rows", "k_cols", "v_cols",
                                                    "n_threads")]
                + [("capacity", ctypes.c_int64), ("n_older", ctypes.c_void_p), ("q", ctypes.c_void_p), ("q_sb", ctypes.c_int64),
                   ("q_sh", ctypes.c_int64)]
                + [(name, _Buf) for name in ("k_q", "k_scale", "k_zero", "v_q", "v_scale", "v_zero")]
                + [(name, ctypes.c_void_p) for name in ("acc", "m", "l")]
                + [("n_recent", ctypes.c_int64), ("recent_k", _Buf), ("recent_v", _Buf), ("recent_keep", ctypes.c_void_p),
                   ("keep_sb", ctypes.c_int64), ("table", ctypes.c_void_p), ("table_sb", ctypes.c_int64),
                   ("page", ctypes.c_int64), ("recent_pos", ctypes.c_void_p), ("pos_sb", ctypes.c_int64),
                   ("sink_size", ctypes.c_int64), ("new_k", ctypes.c_void_p), ("new_v", ctypes.c_void_p)]
                + [(name, ctypes.c_int64) for name in ("new_sb", "new_sh", "new_vsb", "new_vsh")]
                + [("new_slot", ctypes.c_void_p), ("new_pos", ctypes.c_void_p), ("normalize", ctypes.c_int32),
                   ("flush", ctypes.c_void_p)])


class _Side(ctypes.Structure):  # side_t in cpu_attention.c
    _fields_ = [("src", ctypes.c_void_p), ("src_sb", ctypes.c_int64), ("src_sh", ctypes.c_int64),
                ("src_st", ctypes.c_int64), ("payload", _Buf), ("scale", _Buf), ("zero", _Buf), ("F", ctypes.c_int32),
                ("G", ctypes.c_int32)]


class _QuantArgs(ctypes.Structure):  # quant_args_t in cpu_attention.c
    _fields_ = ([(name, ctypes.c_int32) for name in ("B", "H", "D", "N", "bits")]
                + [("rows", ctypes.c_void_p), ("rows_sb", ctypes.c_int64), ("start", ctypes.c_void_p),
                   ("start_sb", ctypes.c_int64), ("side", _Side * 2)])


def cache_folder() -> Path:
    return Path(os.environ.get("KVCACHE_CACHE") or Path.home() / ".cache" / "kvcache" / "cpu_attention")


def _compiler() -> str:
    return os.environ.get("CC", "cc")


def _cpu_flags() -> str:
    """This CPU's feature flags (what -march=native compiles for); the processor name where /proc has none."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.machine() + platform.processor()


def library_path() -> Path:
    """Where the library for this source, compiler and CPU lives (built or not). Raises if there is no compiler."""
    try:
        version = subprocess.run([_compiler(), "--version"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError) as e:
        raise RuntimeError(f"no working C compiler '{_compiler()}' ({e}): install gcc or set CC") from None
    key = hashlib.sha256("\n".join([SOURCE.read_text(), version, _cpu_flags(), " ".join(FLAGS)]).encode())
    return cache_folder() / f"cpu_attention-{key.hexdigest()[:16]}.so"


def build() -> Path:
    """The compiled library, built first if this source / compiler / CPU has none yet."""
    global builds
    path = library_path()
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".so")
    os.close(fd)
    try:
        result = subprocess.run([_compiler(), *FLAGS, str(SOURCE), "-o", tmp, "-lm"], capture_output=True, text=True)
        if result.returncode:
            first = next((line for line in result.stderr.splitlines() if "error" in line), result.stderr.strip())
            raise RuntimeError(f"building {SOURCE.name} failed ({first.strip()[:200]}): install gcc with OpenMP "
                               "(apt install gcc) or set CC to one")
        os.replace(tmp, path)  # atomic: another process sees the old name or the whole new file
        builds += 1
    finally:
        Path(tmp).unlink(missing_ok=True)
    return path


def _load():
    global _lib, _error
    if _lib is None:
        if _error is not None:
            raise RuntimeError(_error)
        try:
            lib = ctypes.CDLL(str(build()))
        except (RuntimeError, OSError) as e:
            _error = str(e)
            raise RuntimeError(_error) from None
        lib.older_attention.argtypes = [ctypes.POINTER(_Args)]
        lib.older_attention.restype = ctypes.c_int
        lib.quantize_into.argtypes = [ctypes.POINTER(_QuantArgs)]
        lib.quantize_into.restype = ctypes.c_int
        _lib = lib
    return _lib


def load_error() -> Optional[str]:
    """Why the kernel cannot be built or loaded here (no C compiler with OpenMP), or None when it can. Never raises."""
    try:
        _load()
        return None
    except Exception as e:
        return str(e)


def available() -> bool:
    return load_error() is None


def _buf(t: Optional[Tensor]) -> _Buf:
    if t is None:
        return _Buf(None, 0, 0, 0)
    return _Buf(t.data_ptr(), t.stride(0), t.stride(1), t.stride(2))


def _last_contiguous(t: Optional[Tensor]) -> Optional[Tensor]:
    """The C kernel takes any strides of the first three dims but needs the last one contiguous."""
    return t if t is None or t.stride(-1) == 1 or t.shape[-1] == 1 else t.contiguous()


def _layout(q: Tensor, k_q: Tensor, k_scale: Tensor, k_zero: Optional[Tensor], v_q: Tensor, v_scale: Tensor,
            v_zero: Optional[Tensor], n_older: Tensor, fmt: str, k_granularity: str, group_size: int,
            recent_k: Optional[Tensor] = None, recent_v: Optional[Tensor] = None,
            recent_keep: Optional[Tensor] = None, table: Optional[Tensor] = None, page: int = 0):
    """(the kernel's arguments, (acc, m, l), the tensors they point into) for checked arguments (older_attention's):
    the tensors must outlive the call (a copy made here for the kernel's layout is only held there)."""
    fmt = get_format(fmt)
    B, HQ, D = q.shape
    H = k_q.shape[1]
    q = _last_contiguous(q.float())
    k_q, k_scale, k_zero, v_q, v_scale, v_zero = map(_last_contiguous, (k_q, k_scale, k_zero, v_q, v_scale, v_zero))
    n_older = n_older.to(torch.int64).contiguous()
    if recent_k is not None:
        recent_k, recent_v = _last_contiguous(recent_k.float()), _last_contiguous(recent_v.float())
        recent_keep = recent_keep.contiguous()
    acc = q.new_empty(B, HQ, D)
    m, l = q.new_empty(B, HQ), q.new_empty(B, HQ)
    per_channel = k_granularity == "channel"
    cols = fmt.channel_group(D, group_size)
    # Tokens every buffer holds: the kernel refuses an n_older past it (there, not here: reading n_older here
    # would be a host sync, and under torch.compile a graph break).
    capacity = min(k_q.shape[2], v_q.shape[2], v_scale.shape[2], k_scale.shape[2] * (group_size if per_channel else 1))
    if table is not None:  # the logical tokens the table maps (its entries are the pool's blocks)
        table = table.to(torch.int64).contiguous()
        capacity = table.shape[1] * page
    args = _Args(B=B, H=H, G=HQ // H, D=D, bits=fmt.bits, fp8=fmt.payload_dtype == torch.float8_e4m3fn,
                 k_rows=group_size if per_channel else 1, k_cols=1 if per_channel else cols, v_cols=cols,
                 n_threads=torch.get_num_threads(), capacity=capacity, n_older=n_older.data_ptr(), q=q.data_ptr(),
                 q_sb=q.stride(0), q_sh=q.stride(1), k_q=_buf(k_q), k_scale=_buf(k_scale), k_zero=_buf(k_zero), v_q=_buf(v_q),
                 v_scale=_buf(v_scale), v_zero=_buf(v_zero), acc=acc.data_ptr(), m=m.data_ptr(), l=l.data_ptr(),
                 n_recent=0 if recent_k is None else recent_k.shape[2], recent_k=_buf(recent_k),
                 recent_v=_buf(recent_v), recent_keep=None if recent_keep is None else recent_keep.data_ptr(),
                 keep_sb=0 if recent_keep is None else recent_keep.stride(0),
                 table=None if table is None else table.data_ptr(), table_sb=0 if table is None else table.stride(0),
                 page=page)
    return args, (acc, m, l), (q, k_q, k_scale, k_zero, v_q, v_scale, v_zero, n_older, recent_k, recent_v,
                               recent_keep, table)


def _call(args: _Args, n_older: Tensor):
    code = _load().older_attention(ctypes.byref(args))
    if code == 4:
        raise ValueError(f"n_older {n_older.tolist()} is negative or past the store's {args.capacity} tokens")
    if code == 5:
        raise ValueError("cpu_attention.c refused the step's flush: groups that do not tile head_dim or the rows, or "
                         "a key group past 256 tokens")
    if code:
        raise ValueError(f"cpu_attention.c refused its arguments (code {code}): older_attention's checks missed a case")


def _run(q: Tensor, k_q: Tensor, k_scale: Tensor, k_zero: Optional[Tensor], v_q: Tensor, v_scale: Tensor,
         v_zero: Optional[Tensor], n_older: Tensor, fmt: str, k_granularity: str, group_size: int,
         recent_k: Optional[Tensor] = None, recent_v: Optional[Tensor] = None,
         recent_keep: Optional[Tensor] = None, table: Optional[Tensor] = None,
         page: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """The kernel call, on checked arguments (older_attention's): the custom op's body, and what eager calls run
    directly (the op dispatcher costs about 40 us a call)."""
    args, outputs, _held = _layout(q, k_q, k_scale, k_zero, v_q, v_scale, v_zero, n_older, fmt, k_granularity,
                                   group_size, recent_k, recent_v, recent_keep, table, page)
    _call(args, n_older)
    return outputs


@torch.library.custom_op("kvcache::older_attention", mutates_args=())
def _older_attention_op(q: Tensor, k_q: Tensor, k_scale: Tensor, k_zero: Optional[Tensor], v_q: Tensor,
                        v_scale: Tensor, v_zero: Optional[Tensor], n_older: Tensor, fmt: str, k_granularity: str,
                        group_size: int, recent_k: Optional[Tensor], recent_v: Optional[Tensor],
                        recent_keep: Optional[Tensor], table: Optional[Tensor],
                        page: int) -> tuple[Tensor, Tensor, Tensor]:
    return _run(q, k_q, k_scale, k_zero, v_q, v_scale, v_zero, n_older, fmt, k_granularity, group_size, recent_k,
                recent_v, recent_keep, table, page)


@_older_attention_op.register_fake
def _(q, k_q, k_scale, k_zero, v_q, v_scale, v_zero, n_older, fmt, k_granularity, group_size, recent_k, recent_v,
      recent_keep, table, page):
    B, HQ, D = q.shape
    return q.new_empty(B, HQ, D, dtype=torch.float32), q.new_empty(B, HQ, dtype=torch.float32), \
        q.new_empty(B, HQ, dtype=torch.float32)


def older_attention(q: Tensor, k_q: Tensor, k_scale: Tensor, k_zero: Optional[Tensor], v_q: Tensor, v_scale: Tensor,
                    v_zero: Optional[Tensor], n_older: Tensor, fmt, k_granularity: str, group_size: int,
                    recent_k: Optional[Tensor] = None, recent_v: Optional[Tensor] = None,
                    recent_keep: Optional[Tensor] = None, table: Optional[Tensor] = None, page: int = 0):
    """Softmax partials of decode attention over the first n_older[b] tokens of a quantized older store and, when
    recent_k, recent_v (B, H, NH, D) and recent_keep (B, NH) bool are given, the recent slots recent_keep marks:
    a quantize_kv decode step's whole attention is then acc / l.

    q (B, HQ, D) float32, already rotated and multiplied by the softmax scale; query head i reads KV head i // (HQ/H).
    k_q ... v_zero: the store's buffers as QuantizedStore holds them (B, H, M_alloc, ...), contiguous or batch rows of
    one (the last dim must be contiguous, else it is copied); zero-points None for the symmetric formats. n_older (B,)
    int64: valid tokens per sequence (0 allowed; a whole number of key groups when keys are per channel). fmt: a
    kernels.formats Format or its --bits name; k_granularity "token" or "channel"; group_size as the store's.
    table (B, blocks) int32 / int64, page: a paged store (kv_cache/paging.py): the buffers are the pool's (1, H, P,
    ...), token t of sequence b in pool row table[b, t // page] * page + t % page; page a multiple of the key group.

    Returns float32 (acc (B, HQ, D), m (B, HQ), l (B, HQ)) with s_t = q . k_t: m = max_t s_t, l = sum_t exp(s_t - m),
    acc = sum_t exp(s_t - m) v_t; an empty row has m = -inf, l = 0, acc = 0. Merging with the attention over the
    16-bit window, given as its own (acc_w, m_w, l_w):
        m* = max(m, m_w);  a = exp(m - m*), a_w = exp(m_w - m*)  (0 for a part whose m is -inf)
        out = (a acc + a_w acc_w) / (a l + a_w l_w)
    """
    args = _checked(q, k_q, k_scale, k_zero, v_q, v_scale, v_zero, n_older, fmt, k_granularity, group_size, recent_k,
                    recent_v, recent_keep, table, page)
    return torch.ops.kvcache.older_attention(*args) if torch.compiler.is_compiling() else _run(*args)


def _checked(q, k_q, k_scale, k_zero, v_q, v_scale, v_zero, n_older, fmt, k_granularity, group_size, recent_k,
             recent_v, recent_keep, table, page) -> tuple:
    """older_attention's arguments checked (a one-line ValueError naming what is wrong), as _run takes them."""
    fmt = get_format(fmt)
    if table is not None:  # the pool, seen with batch stride 0 (the table maps each sequence's tokens)
        if table.dim() != 2 or table.shape[0] != q.shape[0] or page <= 0 or page % (
                group_size if k_granularity == "channel" else 1):
            raise ValueError(f"table must be (B, blocks) = ({q.shape[0]}, ...) with page > 0 a whole number of key "
                             f"groups, got {tuple(table.shape)} and page {page}")
        k_q, k_scale, k_zero, v_q, v_scale, v_zero = (None if t is None else t.expand(q.shape[0], *t.shape[1:])
                                                      for t in (k_q, k_scale, k_zero, v_q, v_scale, v_zero))
    if q.dim() != 3 or k_q.dim() != 4:
        raise ValueError(f"older_attention takes q (B, HQ, D) and a store (B, H, M, ...), got {tuple(q.shape)} and "
                         f"{tuple(k_q.shape)}")
    B, HQ, D = q.shape
    H = k_q.shape[1]
    if q.device.type != "cpu":
        raise ValueError(f"older_attention is the CPU kernel, got q on {q.device}: use kernels.decode_attention on GPUs")
    if HQ % H or D > MAX_HEAD_DIM or D % fmt.per_byte:
        raise ValueError(f"older_attention needs HQ a multiple of H and head_dim <= {MAX_HEAD_DIM} (a multiple of "
                         f"{fmt.per_byte} for {fmt.label}): got HQ {HQ}, H {H}, D {D}")
    cols = fmt.channel_group(D, group_size)
    if D % cols or cols % fmt.per_byte:
        raise ValueError(f"group_size {group_size} must divide head_dim {D} and be a multiple of {fmt.per_byte} "
                         f"for {fmt.label}")
    if k_granularity not in ("token", "channel"):
        raise ValueError(f"k_granularity {k_granularity!r}: use 'token' or 'channel'")
    k_meta = (D,) if k_granularity == "channel" else (D // cols,)
    for name, t, meta in (("k_scale", k_scale, k_meta), ("v_scale", v_scale, (D // cols,)),
                          ("k_zero", k_zero, k_meta), ("v_zero", v_zero, (D // cols,))):
        absent = name.endswith("zero") and not fmt.asymmetric
        if (t is None) != absent:
            raise ValueError(f"{name} must {'be None' if absent else 'be given'} for {fmt.label}")
        if t is not None and (tuple(t.shape[:2]) != (B, H) or tuple(t.shape[3:]) != meta or t.dtype != torch.float16):
            raise ValueError(f"{name} is {tuple(t.shape)} {t.dtype}, expected float16 ({B}, {H}, rows, {meta[0]}) "
                             f"for {fmt.label} keys per {k_granularity} (kv_cache/stores.py's layout)")
    for name, t in (("k_q", k_q), ("v_q", v_q)):
        if t.shape[:2] != (B, H) or t.shape[3] != D // fmt.per_byte or t.dtype != fmt.payload_dtype:
            raise ValueError(f"{name} is {tuple(t.shape)} {t.dtype}, expected ({B}, {H}, M, {D // fmt.per_byte}) "
                             f"{fmt.payload_dtype}")
    if n_older.shape != (B,):
        raise ValueError(f"n_older must be (B,) = ({B},), got {tuple(n_older.shape)}")
    if (recent_k is None) != (recent_v is None) or (recent_k is None) != (recent_keep is None):
        raise ValueError("recent_k, recent_v and recent_keep go together: give all three or none")
    if recent_k is not None and (recent_k.shape[:2] != (B, H) or recent_k.shape[3] != D
                                 or recent_v.shape != recent_k.shape or recent_keep.dtype != torch.bool
                                 or tuple(recent_keep.shape) != (B, recent_k.shape[2])):
        raise ValueError(f"recent_k, recent_v must be ({B}, {H}, NH, {D}) and recent_keep ({B}, NH) bool, got "
                         f"{tuple(recent_k.shape)}, {tuple(recent_v.shape)}, {tuple(recent_keep.shape)} "
                         f"{recent_keep.dtype}")
    return (q, k_q, k_scale, k_zero, v_q, v_scale, v_zero, n_older, fmt.name, k_granularity, group_size, recent_k,
            recent_v, recent_keep, table, page)


class DecodeStep:
    """A quantize_kv layer's whole eager decode step on the CPU in one kernel call, its arguments checked and laid
    out once: the step's token written into its ring slot, then the attention over the older store's codes and the
    ring's slots that hold a token not yet in the store (kept by the ring's slot positions), divided by its sum.
    older_attention checks and lays out its arguments on every call and its caller writes the ring and builds the
    keep mask with torch ops: at short context those cost more than the attention itself.

    store: the older store's buffers for `batch` sequences (QuantizedStore.kernel_inputs: k_q ... v_zero, and
    older_table / older_block when paged); ring_k, ring_v (batch, H, NH, D) float32 and ring_pos (batch, NH) int64:
    the ring's buffers, written in place by every call (they must be those tensors, not copies); sink_size: the
    positions below it are sinks. The buffers are bound by address: a cache builds a new DecodeStep when they move
    (bound_to)."""

    def __init__(self, store: dict, fmt, k_granularity: str, group_size: int, ring_k: Tensor, ring_v: Tensor,
                 ring_pos: Tensor, sink_size: int, n_head: int, flush_size: int):
        batch, H, NH, D = ring_k.shape
        if ring_k.dtype != torch.float32 or ring_v.dtype != torch.float32 or ring_k.stride(-1) != 1 \
                or ring_v.stride(-1) != 1 or ring_pos.dtype != torch.int64 or ring_pos.stride(-1) != 1 \
                or tuple(ring_pos.shape) != (batch, NH):
            raise ValueError("DecodeStep writes the ring in place: float32 ring_k / ring_v with head_dim contiguous "
                             f"and int64 ring_pos ({batch}, {NH}), got {ring_k.dtype}, {ring_v.dtype}, "
                             f"{ring_pos.dtype} {tuple(ring_pos.shape)}")
        q = ring_k.new_zeros(batch, n_head, D)
        n_older = torch.zeros(batch, dtype=torch.int64)
        keep = torch.zeros(batch, NH, dtype=torch.bool)
        buffers = [store[name] for name in ("k_q", "k_scale", "k_zero", "v_q", "v_scale", "v_zero")]
        checked = _checked(q, *buffers, n_older, fmt, k_granularity, group_size, ring_k, ring_v, keep,
                           store.get("older_table"), store.get("older_block", 0))
        self.args, (_, self.m, self.l), self.held = _layout(*checked)
        self.args.recent_keep, self.args.keep_sb = None, 0
        self.args.recent_pos, self.args.pos_sb, self.args.sink_size = ring_pos.data_ptr(), ring_pos.stride(0), sink_size
        self.args.normalize = 1
        self.batch, self.n_head, self.D = batch, n_head, D
        # Paged: the pool's table (int32, changed as blocks are handed out) is read as int64 afresh each call.
        self.table = store.get("older_table")
        # The flush (flush_size ring slots a sequence into the store) in the same call, where quantize_into serves
        # the format (flushes); paged, into the pool seen with batch stride 0, its starts mapped by the table in C.
        self.flush_args = None
        if quantize_supported(fmt, ring_k.dtype):
            targets = [None if t is None else t.expand(batch, *t.shape[1:]) for t in buffers]
            self.flush_args = _quant_args(ring_k, ring_v, flush_size, *targets)
        self.flushes = self.flush_args is not None
        self.bound_to = (ring_k.data_ptr(), buffers[0].data_ptr())

    def __call__(self, q: Tensor, n_older: Tensor, new_k: Tensor, new_v: Tensor, new_slot: Tensor,
                 new_pos: Tensor, flush: Optional[tuple[Tensor, Tensor]] = None) -> Tensor:
        """q (R, n_head, D) float32 rotated and scaled, R <= batch; n_older (R,) int64; the step's token new_k,
        new_v (R, H, D) float32 (head_dim contiguous) at positions new_pos (R,) int64 into ring slots new_slot (R,)
        int64; flush (where flushes): (ring slots (R, flush_size), older token (R,)) int64 contiguous, quantized
        first, as quantize_into's rows and start. Returns the attention (R, n_head, D) float32."""
        R = q.shape[0]
        if R > self.batch or q.dtype != torch.float32 or q.stride(-1) != 1 or new_k.dtype != torch.float32 \
                or new_v.dtype != torch.float32 or new_k.stride(-1) != 1 or new_v.stride(-1) != 1 \
                or n_older.dtype != torch.int64 or new_slot.dtype != torch.int64 or new_pos.dtype != torch.int64:
            raise ValueError(f"DecodeStep takes at most {self.batch} rows of float32 q / new_k / new_v (head_dim "
                             "contiguous) and int64 n_older / new_slot / new_pos")
        n_older, new_slot, new_pos = n_older.contiguous(), new_slot.contiguous(), new_pos.contiguous()
        out = q.new_empty(R, self.n_head, self.D)
        a = self.args
        a.B, a.n_threads = R, torch.get_num_threads()
        a.q, a.q_sb, a.q_sh = q.data_ptr(), q.stride(0), q.stride(1)
        a.n_older, a.acc, a.m, a.l = n_older.data_ptr(), out.data_ptr(), self.m.data_ptr(), self.l.data_ptr()
        a.new_k, a.new_sb, a.new_sh = new_k.data_ptr(), new_k.stride(0), new_k.stride(1)
        a.new_v, a.new_vsb, a.new_vsh = new_v.data_ptr(), new_v.stride(0), new_v.stride(1)
        a.new_slot, a.new_pos = new_slot.data_ptr(), new_pos.data_ptr()
        if self.table is not None:
            table = self.table[:R].to(torch.int64).contiguous()
            a.table, a.table_sb = table.data_ptr(), table.stride(0)
        if flush is not None:
            rows, start = flush
            f = self.flush_args
            f.B, f.rows, f.rows_sb, f.start, f.start_sb = R, rows.data_ptr(), rows.stride(0), start.data_ptr(), 1
            a.flush = ctypes.addressof(f)
        try:
            _call(a, n_older)
        finally:  # no pointer into this call's tensors outlives it
            a.q = a.n_older = a.acc = a.new_k = a.new_v = a.new_slot = a.new_pos = a.flush = None
            if self.table is not None:
                a.table = None
        return out


def quantize_supported(fmt, dtype) -> bool:
    """Whether quantize_into serves a store of format fmt fed from a ring of dtype: float32 sources, int8 or the
    asymmetric formats (fp8 keeps kernels/quantize.py's PyTorch route)."""
    fmt = get_format(fmt)
    return dtype == torch.float32 and (fmt.asymmetric or fmt.payload_dtype == torch.int8)


def _quant_args(k: Tensor, v: Tensor, N: int, k_q: Tensor, k_scale: Tensor, k_zero: Optional[Tensor], v_q: Tensor,
                v_scale: Tensor, v_zero: Optional[Tensor]) -> _QuantArgs:
    """quantize_into's arguments for N source rows of k and v a sequence, all but the rows and starts."""
    B, H, _, D = k.shape
    sides = []
    for x, payload, scale, zero in ((k, k_q, k_scale, k_zero), (v, v_q, v_scale, v_zero)):
        per_byte, F, G = older_format(payload, scale, D)
        sides.append(_Side(src=x.data_ptr(), src_sb=x.stride(0), src_sh=x.stride(1), src_st=x.stride(2),
                           payload=_buf(payload), scale=_buf(scale), zero=_buf(zero), F=F, G=G))
    return _QuantArgs(B=B, H=H, D=D, N=N, bits=8 // per_byte, side=(_Side * 2)(*sides))


def quantize_into(k: Tensor, v: Tensor, rows: Tensor, start: Tensor, k_q: Tensor, k_scale: Tensor,
                  k_zero: Optional[Tensor], v_q: Tensor, v_scale: Tensor, v_zero: Optional[Tensor]):
    """kernels.quantize_append.quantize_into on the CPU, in one C call, eager only (the decode step's flush; compiled,
    Inductor fuses kernels/quantize.py's PyTorch route instead): k[b, :, rows[b]] and v[b, :, rows[b]] (float32
    (B, H, ., D), last dim contiguous) quantized into older tokens start[b] .. start[b] + N - 1 of sequence b of the
    store, the same bytes as quantize_keys / quantize_values. rows int64 (N,) shared or (B, N); start int64 (1,)
    shared or (B,), each a multiple of the key group; the store's buffers may be views of the first B sequences, or
    a pool seen with batch stride 0 (QuantizedStore.append_target). Formats: quantize_supported."""
    B, H, _, D = k.shape
    if k.dtype != torch.float32 or v.dtype != torch.float32 or k.stride(-1) != 1 or v.stride(-1) != 1:
        raise ValueError("quantize_into (CPU) takes float32 k and v with head_dim contiguous")
    if k_q.dtype not in (torch.int8, torch.uint8):
        raise ValueError(f"quantize_into (CPU) writes int8 or packed 4 / 2-bit codes, not {k_q.dtype}")
    rows = rows.to(torch.int64).reshape(-1, rows.shape[-1]).contiguous()  # (1 or B, N)
    start = start.to(torch.int64).reshape(-1).contiguous()
    if rows.shape[0] not in (1, B) or start.numel() not in (1, B):
        raise ValueError(f"rows {tuple(rows.shape)} / start {tuple(start.shape)}: give one shared or one per sequence")
    args = _quant_args(k, v, rows.shape[1], k_q, k_scale, k_zero, v_q, v_scale, v_zero)
    args.rows, args.rows_sb = rows.data_ptr(), rows.stride(0) if rows.shape[0] == B and B > 1 else 0
    args.start, args.start_sb = start.data_ptr(), 1 if start.numel() == B and B > 1 else 0
    if _load().quantize_into(ctypes.byref(args)):
        raise ValueError("cpu_attention.c refused quantize_into's arguments: groups that do not tile head_dim or the "
                         "rows, or a key group past 256 tokens")
