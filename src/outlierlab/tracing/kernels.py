"""Triton kernels of one statistics update on a GPU: two kernels per traced tensor, no host synchronization
and no other launch.

``stats_pass`` reads the tensor once, one program per (row group, block of channels) so that the whole GPU reads
(row groups of 1024, 512 or 256 rows, the longest that leaves :data:`MIN_TILES` programs; each program's loop over
its rows is software-pipelined four steps deep; at the 7B shapes' batch 4 on an H200 this took the pass from 41 to
28 us at 4096 channels and from 103 to 59 us at 11008, bench/kernel_sweep.py; its loads are L2 evict-first,
which took 3% off a 7B profile's device time at batch 1): per-group channel max and sum of |x|
(folded into the state by ``candidates``), each block's part of the row maxima, folded into the token statistics and
the per-update token max that picks the top-k candidates by the group's last program to finish (a ticket counter, no
extra launch); other programs of the same launch compute the channel medians over the fixed row sample and the log2
histogram of the fixed element sample. ``candidates`` picks the ``top_k`` tokens with the largest max (every program
by itself: a bisection on the token maxima's bits, ties to the smaller token), reads their rows, keeps for every
(token, channel) the largest |x| over the batch and writes each program's ``TOP`` best entries as packed int64 keys:
``(|x| bits + 1) << 31 | (MAXF - flat) << 9 | window << 1 | sign`` with ``flat = slot * channels + channel`` (0 =
empty; slots in token order), which sort like |x| and, among equal |x|, prefer the smaller (token, channel),
appended to one list per update; the last ``candidates`` program to finish keeps the list's best ``TOP`` (a sort of
the shortest power-of-two slots that hold the list), and :func:`decode_keys` unpacks them.

The top ``top_k`` distinct (token, channel) keys of an update lie in its ``top_k`` tokens with the largest max
over the batch: a key outside them is beaten by the best key of each of those tokens. So the work of the
candidates does not grow with the batch beyond one read of those rows.

Kernels are compiled by Triton on CUDA and run by Triton's interpreter on CPU tensors (tests).
"""

from __future__ import annotations

import functools
import os

import torch

FLAT_BITS, WIN_BITS = 22, 8
MAXF = (1 << FLAT_BITS) - 1
MAX_BATCH = 1 << WIN_BITS


def available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def fits(batch: int, seq_len: int, channels: int, top_k: int) -> bool:
    """Whether an update of this shape fits the candidate keys (else the caller takes another path)."""
    return batch <= MAX_BATCH and min(top_k, seq_len) * channels <= MAXF


def _next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


@functools.cache
def _kernels():
    """(stats_pass, candidates, fetch) as Triton kernels: compiled on CUDA, or run by Triton's interpreter when
    ``TRITON_INTERPRET=1`` was set before Triton was first imported (CPU tensors; the tests do this)."""
    import triton

    from . import triton_src

    # the window offset changes every update: not specialized (no recompiles for multiples of 16 or 1)
    return (triton.jit(triton_src.stats_pass),
            triton.jit(triton_src.candidates, do_not_specialize=["window0"]),
            triton.jit(triton_src.fetch))


#: the graph path's kernels assume the traced tensor's address is a multiple of this (bytes): its loads are
#: as wide as a direct launch's, which Triton specializes on the real address; other tensors launch directly
ALIGN = 16
BLOCK_M = 16  # channels per median program
#: low bits of a float32 that are zero in every value of a narrower input dtype (23 mantissa bits less its own)
ZERO_LOW_BITS = {torch.bfloat16: 16, torch.float16: 13}
HIST_BLOCK = 1024  # sampled elements per histogram program
KEY_CAP = 1024  # candidate keys a load in the TOP passes that rank lists of more than 8 TOP keys
_SCRATCH: dict[tuple, torch.Tensor] = {}


def scratch(shape: tuple, device: torch.device, slot, dtype: torch.dtype = torch.float32,
            zero: bool = False) -> torch.Tensor:
    """A buffer reused by every update on ``device`` that asks for the same ``slot`` (updates run in stream
    order, each consumes its scratch before the next one writes it; the CPU path's slot names its thread).
    ``zero``: zeroed when made (the kernels that use it leave it zero)."""
    # a buffer made under inference mode cannot be written by torch ops outside it
    key = (shape, device, slot, torch.is_inference_mode_enabled())
    buf = _SCRATCH.get(key)
    if buf is None:
        if len(_SCRATCH) > 16:
            _SCRATCH.clear()
        buf = _SCRATCH[key] = (torch.zeros if zero else torch.empty)(shape, device=device, dtype=dtype)
    return buf


#: geometry overrides (keys of :func:`_geometry`'s knobs: group, bc, r, stages, warps, cand_warps, evict; and
#: no_hist, no_med, which leave the histogram's or the medians' programs out), for kernel benchmarks only
#: (bench/kernel_sweep.py); empty in normal runs
TUNE: dict = {}
#: stats_pass takes the largest row group of GROUPS rows that leaves at least MIN_TILES tiles (~2 per SM of an
#: H200), else the smallest
MIN_TILES = 256
GROUPS = (1024, 512, 256)


@functools.cache
def _geometry(batch: int, seq_len: int, channels: int, top_k: int) -> dict:
    bp = _next_pow2(batch)
    # stats_pass: row groups of TB tokens x every window (the longest of GROUPS that leaves enough tiles to
    # fill the GPU), blocks of BC channels, R rows per step of a loop pipelined over `stages` steps
    bc = max(16, min(TUNE.get("bc", 256), _next_pow2(channels)))
    n_cb = -(-channels // bc)
    for group in (TUNE["group"],) if "group" in TUNE else GROUPS:
        tb = min(_next_pow2(seq_len), max(1, group // bp))
        if -(-seq_len // tb) * n_cb >= MIN_TILES:
            break
    kt = min(top_k, seq_len)
    ktp = _next_pow2(kt)
    top = _next_pow2(top_k)
    block_cb = max(_next_pow2(-(-top // ktp)), min(_next_pow2(channels), max(1, 2048 // ktp)))
    return {"BP": bp, "TB": tb, "R": min(TUNE.get("r", 16), bp * tb), "BC": bc, "CBF": min(16, _next_pow2(n_cb)),
            "NS": TUNE.get("stages", 4), "warps": TUNE.get("warps", 4),
            # the traced tensor's lines evicted first from the L2 cache (its data is read once)
            "evict": "evict_first" if TUNE.get("evict", 1) else "",
            "KT": kt, "KTP": ktp, "TOP": top, "BLOCK_CB": block_cb, "n_rg": -(-seq_len // tb), "n_cb": n_cb,
            "n_med": -(-channels // BLOCK_M), "n_cand": -(-channels // block_cb),
            # every candidates program holds the seq_len token maxima in registers: <= 64 per thread; and
            # gathers its tokens' rows in every window: 8 warps from 4 windows
            "cand_warps": TUNE.get("cand_warps", max(4 if bp < 4 else 8, min(16, _next_pow2(seq_len) // 2048)))}


def list_length(x: torch.Tensor, top_k: int) -> int:
    """How many candidate keys the ``candidates`` programs append for ``x`` [batch, tokens, channels] (what the
    last program then ranks): per block of channels, the entries at or above the token floor (the ``top_k``-th
    largest token max over the batch) among the ``top_k`` tokens, at most TOP a block. A reference on the host,
    for tests and bench/candidate_lists.py; the kernels do not call it."""
    b, s, c = x.shape
    g = _geometry(b, s, c, top_k)
    best = x.abs().float().amax(0)  # [tokens, channels]: each key's largest |x| over the batch
    tok_max = best.amax(1)
    tokens = tok_max.topk(g["KT"]).indices
    keep = best[tokens] >= tok_max[tokens].min()  # [KT, channels]
    blocks = -(-c // g["BLOCK_CB"])
    padded = torch.zeros(g["KT"], blocks * g["BLOCK_CB"], dtype=torch.bool)
    padded[:, :c] = keep
    return int(padded.view(g["KT"], blocks, g["BLOCK_CB"]).sum((0, 2)).clamp(max=g["TOP"]).sum())


def _tl_dtype(dtype: torch.dtype):
    import triton.language as tl

    return {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16,
            torch.float64: tl.float64}[dtype]


def _issue(x, batch, seq_len, window0, max_state, sum_state, rows_idx, elem_idx, top_k, log2_min, log2_max,
           bins_per_octave, bufs: dict, args: torch.Tensor | None = None, ring: int = 0) -> torch.Tensor:
    """Launch one update (stats_pass, candidates) writing into ``bufs``; returns its best keys. With ``args``
    (device int64: x address, window0, max_state and sum_state addresses, the position's rings of ``ring``
    rows: keys, token slots, counter), the kernels read those from it and append the update's keys and slots
    to the rings: the launch sequence of a CUDA graph, replayed for any tensor of the same layout."""
    stats_pass, candidates, _ = _kernels()
    channels = x.shape[1]
    g = _geometry(batch, seq_len, channels, top_k)
    stride_r, stride_c = x.stride()
    indirect = args is not None
    args = args if indirect else bufs["tokmax"]  # an unused pointer when direct
    common = {"INDIRECT": indirect, "XDT": _tl_dtype(x.dtype), "stride_r": stride_r, "stride_c": stride_c,
              "B": batch, "S": seq_len, "C": channels, "n_rg": g["n_rg"]}
    # (TUNE's no_hist / no_med leave those programs out: what they cost, for kernel benchmarks only)
    n_hist = 0 if TUNE.get("no_hist") else -(-elem_idx.numel() // HIST_BLOCK)
    stats_pass[(n_hist + g["n_rg"] * g["n_cb"] + (0 if TUNE.get("no_med") else g["n_med"]),)](
        x, max_state, sum_state, bufs["part"], bufs["tokmax"], rows_idx, elem_idx, args, bufs["rpart"],
        bufs["ticket"], **common, KR=rows_idx.numel(), n_elem=elem_idx.numel(), n_hist=n_hist, n_cb=g["n_cb"],
        lo=2.0 ** log2_min, hi=2.0 ** log2_max * 0.999, log2_min=float(log2_min),
        bins_per_octave=float(bins_per_octave), n_bins=(log2_max - log2_min) * bins_per_octave,
        BP=g["BP"], TB=g["TB"], R=g["R"], BC=g["BC"], CBF=g["CBF"], KRP=_next_pow2(rows_idx.numel()),
        BLOCK_M=BLOCK_M, NE=HIST_BLOCK, NS=g["NS"], EVICT=g["evict"], num_warps=g["warps"])
    candidates[(g["n_cand"],)](x, bufs["tokmax"], bufs["tok"], bufs["keys"], bufs["top"], bufs["count"],
                               bufs["cticket"], bufs["tokw"], max_state, sum_state, bufs["part"], window0, args,
                               **common, KT=g["KT"], use_floor=int(g["KT"] == top_k), n_cand=g["n_cand"],
                               KTP=g["KTP"], BLOCK_C=g["BLOCK_CB"], TOP=g["TOP"], RB=32, CAP=KEY_CAP,
                               SP=_next_pow2(seq_len), RING=ring, TZ=ZERO_LOW_BITS.get(x.dtype, 0),
                               num_warps=g["cand_warps"])
    return bufs["top"]


def _buffers(batch: int, seq_len: int, channels: int, top_k: int, device: torch.device, fresh: bool) -> dict:
    """The update's buffers. Direct launches (``fresh``) share the scratch ones (stream order) and get fresh
    outputs; a graph owns all of them."""
    g = _geometry(batch, seq_len, channels, top_k)
    f32, i32, i64 = torch.float32, torch.int32, torch.int64
    # name: (shape, dtype, zeroed when made, scratch slot or None for the update's own outputs)
    table = {"tokmax": ((seq_len,), f32, False, 0), "part": ((2, g["n_rg"], channels), f32, False, 1),
             "keys": ((g["n_cand"] * g["TOP"],), i64, False, 2), "tok": ((g["n_cand"] * g["KTP"],), i32, False, 3),
             "rpart": ((g["n_cb"], batch * seq_len), f32, False, 6),
             "ticket": ((g["n_rg"],), i32, True, 7), "count": ((1,), i64, True, 8),
             "cticket": ((1,), i32, True, 9), "top": ((g["TOP"],), i64, False, None),
             "tokw": ((g["KT"],), i64, False, None)}
    bufs = {}
    for name, (shape, dtype, zeroed, slot) in table.items():
        if fresh and slot is not None:
            bufs[name] = scratch(shape, device, slot, dtype, zero=zeroed)
        else:
            bufs[name] = (torch.zeros if zeroed else torch.empty)(shape, device=device, dtype=dtype)
    return bufs


def update(x: torch.Tensor, batch: int, seq_len: int, window0: int, max_state: torch.Tensor,
           sum_state: torch.Tensor, rows_idx: torch.Tensor, elem_idx: torch.Tensor, top_k: int, log2_min: int,
           log2_max: int, bins_per_octave: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Fold ``x`` [batch * seq_len, channels], whose first window is ``window0``, into the packed states in
    place (layout of :class:`~outlierlab.tracing.stats.PositionStats`); returns the update's best candidate keys
    (int64) and ``window0 * seq_len + token`` of each candidate slot, both on the device (no host sync)."""
    channels = x.shape[1]
    if not fits(batch, seq_len, channels, top_k):
        raise ValueError(f"batch {batch}, {channels} channels: too large for the candidate keys (see fits)")
    if x.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("the Triton statistics kernels run on CUDA tensors, or on CPU tensors under Triton's "
                           "interpreter (TRITON_INTERPRET=1 set before triton is imported)")
    bufs = _buffers(batch, seq_len, channels, top_k, x.device, fresh=True)
    keys = _issue(x, batch, seq_len, window0, max_state, sum_state, rows_idx, elem_idx, top_k, log2_min, log2_max,
                  bins_per_octave, bufs)
    return keys, bufs["tokw"]


class _Staging:
    """Pinned host rows holding the per-update arguments of graph replays on one device, in replay order: the
    graph's first kernel (``fetch``) copies row ``slot % ROWS`` to the device and advances ``slot``, a device
    counter that every graph of the device shares, as the host's ``cursor`` follows the same replays.

    A row is written by the host and read by a later replay: a half of the ring is reused only after an event
    recorded when the host last left it has completed (the host cannot overwrite a row not yet read)."""

    ROWS = 4096

    def __init__(self, device: torch.device):
        self.rows = torch.zeros(self.ROWS, 8, dtype=torch.int64).pin_memory()
        self.np = self.rows.numpy()
        self.slot = torch.zeros(1, dtype=torch.int64, device=device)
        self.cursor = 0
        self.events: list = [None, None]
        self.device = device

    def next(self) -> int:
        i = self.cursor
        half = self.ROWS // 2
        if i % half == 0:
            h = i // half
            if self.events[h] is not None:
                self.events[h].synchronize()
            self.events[1 - h] = torch.cuda.Event()
            self.events[1 - h].record(torch.cuda.current_stream(self.device))
        self.cursor = (i + 1) % self.ROWS
        return i


_STAGING: dict[torch.device, _Staging] = {}


class GraphedUpdate:
    """:func:`update` captured once as a CUDA graph for one layout (dtype, shape, strides, constants) and
    replayed for any tensor and any position of that layout: a first kernel copies the tensor's, the states'
    and the rings' addresses from pinned host memory (:class:`_Staging`) to a device buffer, the kernels read
    them there, and ``candidates`` appends the update's keys to the position's own rings. A replay costs the
    host a row of numbers and one graph launch."""

    def __init__(self, x: torch.Tensor, batch: int, seq_len: int, rows_idx: torch.Tensor, elem_idx: torch.Tensor,
                 top_k: int, log2_min: int, log2_max: int, bins_per_octave: int, ring: int):
        dev = x.device
        self.consts = (batch, seq_len, top_k, log2_min, log2_max, bins_per_octave)
        self.rows_idx, self.elem_idx = rows_idx, elem_idx  # kept alive: the graph reads their addresses
        self.ring = ring
        self.bufs = _buffers(batch, seq_len, x.shape[1], top_k, dev, fresh=False)
        self.args = torch.zeros(8, dtype=torch.int64, device=dev)
        self.staging = _STAGING.setdefault(dev, _Staging(dev))
        g = _geometry(batch, seq_len, x.shape[1], top_k)
        self.kt, self.top = g["KT"], g["TOP"]
        # a stand-in of the same layout for the warm-up launch (compiles the kernels) and the capture
        self.like = torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device=dev).zero_()
        state = self.new_state(x.shape[1])
        self._write_args(self.like, 0, *state)
        stream = torch.cuda.Stream(dev)
        stream.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(stream):
            self._launch()
        torch.cuda.current_stream(dev).wait_stream(stream)
        torch.cuda.synchronize(dev)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self._launch()

    def new_state(self, channels: int) -> tuple[torch.Tensor, ...]:
        """(max_state, sum_state, ring_keys, ring_tokw, counter) stand-ins for the warm-up."""
        dev = self.args.device
        _, seq_len, _, log2_min, log2_max, bpo = self.consts
        n_bins = (log2_max - log2_min) * bpo
        return (torch.zeros(channels + seq_len, device=dev), torch.zeros(
            2 * channels + seq_len + n_bins, device=dev, dtype=torch.float64),
            torch.zeros(self.ring, self.top, device=dev, dtype=torch.int64),
            torch.zeros(self.ring, self.kt, device=dev, dtype=torch.int64),
            torch.zeros(1, device=dev, dtype=torch.int64))

    def _launch(self) -> None:
        _, _, fetch = _kernels()
        fetch[(1,)](self.staging.rows, self.staging.slot, self.args, ROWS=_Staging.ROWS)
        _issue(self.like, *self.consts[:2], 0, self.like, self.like, self.rows_idx, self.elem_idx,
               *self.consts[2:], self.bufs, args=self.args, ring=self.ring)

    def _write_args(self, x, window0, max_state, sum_state, ring_keys, ring_tokw, counter) -> None:
        self.staging.np[self.staging.next(), :7] = (
            x.data_ptr(), window0, max_state.data_ptr(), sum_state.data_ptr(), ring_keys.data_ptr(),
            ring_tokw.data_ptr(), counter.data_ptr())

    def replay(self, x, window0, max_state, sum_state, ring_keys, ring_tokw, counter) -> None:
        if torch.cuda.current_device() != x.device.index:  # a model placed on several GPUs
            with torch.cuda.device(x.device):
                return self.replay(x, window0, max_state, sum_state, ring_keys, ring_tokw, counter)
        self._write_args(x, window0, max_state, sum_state, ring_keys, ring_tokw, counter)
        self.graph.replay()


_GRAPHS: dict[tuple, GraphedUpdate] = {}


def ring_numel(rows: int, seq_len: int, top_k: int) -> int:
    """The int64 elements of a position's rings (:func:`new_ring`)."""
    g = _geometry(1, seq_len, 1, top_k)
    return rows * (g["TOP"] + g["KT"]) + 1


def new_ring(rows: int, seq_len: int, top_k: int, device: torch.device,
             buf: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
    """A position's rings for the graph path: (keys [rows, TOP], token slots [rows, KT], counter [1]), views
    of one zeroed int64 allocation (``buf``, :func:`ring_numel` elements, where given)."""
    g = _geometry(1, seq_len, 1, top_k)
    if buf is None:
        buf = torch.zeros(ring_numel(rows, seq_len, top_k), device=device, dtype=torch.int64)
    keys, slots, counter = buf.split([rows * g["TOP"], rows * g["KT"], 1])
    return keys.view(rows, g["TOP"]), slots.view(rows, g["KT"]), counter


def graphed(x: torch.Tensor, batch: int, seq_len: int, rows_idx, elem_idx, top_k: int, log2_min: int,
            log2_max: int, bins_per_octave: int, ring: int, before_capture=None) -> GraphedUpdate:
    """The captured update for ``x``'s layout (captured at its first use in the process, after
    ``before_capture()``: the capture's warm-up launch reads the device's shared staging rows)."""
    key = (x.device, x.dtype, tuple(x.shape), x.stride(), batch, seq_len, rows_idx.data_ptr(), elem_idx.data_ptr(),
           top_k, log2_min, log2_max, bins_per_octave, ring, torch.is_inference_mode_enabled())
    g = _GRAPHS.get(key)
    if g is None:
        if before_capture is not None:
            before_capture()
        with torch.cuda.device(x.device):
            g = _GRAPHS[key] = GraphedUpdate(x, batch, seq_len, rows_idx, elem_idx, top_k, log2_min, log2_max,
                                             bins_per_octave, ring)
    return g


def decode_keys(keys: torch.Tensor, tokw: torch.Tensor, channels: int, seq_len: int):
    """Unpack candidate keys ``[updates, TOP]`` with their slots' ``window0 * seq_len + token`` ``[updates, KT]``
    into (|x|, x, window, token, channel); empty keys get |x| = -1."""
    valid = keys > 0
    bits = ((keys >> 31) - 1).clamp(min=0).to(torch.int32)
    absv = torch.where(valid, bits.view(torch.float32), torch.full_like(bits, -1, dtype=torch.float32))
    low = keys & ((1 << 31) - 1)
    sign = (low & 1).bool()
    window = (low >> 1) & (MAX_BATCH - 1)
    flat = MAXF - (low >> (WIN_BITS + 1))
    flat = torch.where(valid, flat, torch.zeros_like(flat))
    slot = tokw.gather(1, flat // channels)
    return absv, torch.where(sign, -absv, absv), slot // seq_len + window, slot % seq_len, flat % channels
