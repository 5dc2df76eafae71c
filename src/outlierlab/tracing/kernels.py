"""Triton kernels of one statistics update on a GPU: two launches per traced tensor, no host synchronization.

``stats_pass`` reads the tensor once: per-channel max and sum of |x| (atomics into the position's state), per
row max folded into the token statistics, and the per-update token max that picks the top-k candidates; extra
programs of the same launch compute the channel medians over the fixed row sample and the log2 histogram of
the fixed element sample. ``candidates`` reads the rows of the ``top_k`` tokens with the largest max, keeps for
every (token, channel) the largest |x| over the batch and writes each program's ``TOP`` best entries as
packed int64 keys: ``(|x| bits + 1) << 31 | (MAXF - flat) << 9 | window << 1 | sign`` with ``flat = slot *
channels + channel`` (0 = empty), which sort like |x| and, among equal |x|, prefer the smaller (token slot,
channel); one ``topk`` keeps the update's best ``TOP``, and :func:`decode_keys` unpacks them.

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
    """(stats_pass, candidates) as Triton kernels: compiled on CUDA, or run by Triton's interpreter when
    ``TRITON_INTERPRET=1`` was set before Triton was first imported (CPU tensors; the tests do this)."""
    import triton

    from . import triton_src

    # the window offset changes every update: not specialized (no recompiles for multiples of 16 or 1)
    return (triton.jit(triton_src.stats_pass),
            triton.jit(triton_src.candidates, do_not_specialize=["window0"]))


BLOCK_M = 16  # channels per median program
_SCRATCH: dict[tuple, torch.Tensor] = {}


def _scratch(shape: tuple, device: torch.device, slot: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A buffer reused by every update on ``device`` (updates run in stream order, each consumes its scratch
    before the next one writes it)."""
    key = (shape, device, slot)
    buf = _SCRATCH.get(key)
    if buf is None:
        if len(_SCRATCH) > 16:
            _SCRATCH.clear()
        buf = _SCRATCH[key] = torch.empty(shape, device=device, dtype=dtype)
    return buf


@functools.cache
def _geometry(batch: int, seq_len: int, channels: int, top_k: int) -> dict:
    bp = _next_pow2(batch)
    rows = batch * seq_len
    target = 64 if rows >= 8192 else 32 if rows >= 2048 else 16
    bt = max(1, target // bp)
    block_c = max(16, min(_next_pow2(channels), 8192 // (bp * bt)))
    kt = min(top_k, seq_len)
    ktp = _next_pow2(kt)
    top = _next_pow2(top_k)
    block_cb = max(_next_pow2(-(-top // ktp)), min(_next_pow2(channels), max(1, 2048 // ktp)))
    return {"BP": bp, "BT": bt, "BLOCK_C": block_c, "KT": kt, "KTP": ktp, "TOP": top, "BLOCK_CB": block_cb}


def update(x: torch.Tensor, batch: int, seq_len: int, window0: int, max_state: torch.Tensor,
           sum_state: torch.Tensor, rows_idx: torch.Tensor, elem_idx: torch.Tensor, top_k: int, log2_min: int,
           log2_max: int, bins_per_octave: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Fold ``x`` [batch * seq_len, channels], whose first window is ``window0``, into the packed states in
    place (layout of :class:`~outlierlab.tracing.stats.PositionStats`); returns the update's best candidate keys
    (int64) and ``window0 * seq_len + token`` of each candidate slot, both on the device (no host sync)."""
    channels = x.shape[1]
    if not fits(batch, seq_len, channels, top_k):
        raise ValueError(f"batch {batch}, {channels} channels: too large for the candidate keys (see fits)")
    g = _geometry(batch, seq_len, channels, top_k)
    if x.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("the Triton statistics kernels run on CUDA tensors, or on CPU tensors under Triton's "
                           "interpreter (TRITON_INTERPRET=1 set before triton is imported)")
    stats_pass, candidates = _kernels()
    kr = rows_idx.numel()
    n_main = -(-seq_len // g["BT"])
    n_med = -(-channels // BLOCK_M)
    dev = x.device
    tokmax = _scratch((seq_len,), dev, 0)
    part = _scratch((2, n_main, channels), dev, 1)
    stride_r, stride_c = x.stride()
    stats_pass[(1 + n_main + n_med,)](
        x, max_state, sum_state, part, tokmax, rows_idx, elem_idx,
        stride_r=stride_r, stride_c=stride_c, B=batch, S=seq_len, C=channels, KR=kr, n_elem=elem_idx.numel(),
        n_main=n_main, lo=2.0 ** log2_min, hi=2.0 ** log2_max * 0.999, log2_min=float(log2_min),
        bins_per_octave=float(bins_per_octave), n_bins=(log2_max - log2_min) * bins_per_octave,
        BP=g["BP"], BT=g["BT"], BLOCK_C=g["BLOCK_C"], KRP=_next_pow2(kr), BLOCK_M=BLOCK_M, NE=1024, num_warps=8)
    tok_val, tok_idx = tokmax.topk(g["KT"], sorted=False)
    n_cand = -(-channels // g["BLOCK_CB"])
    keys = torch.empty(n_cand * g["TOP"], device=dev, dtype=torch.int64) if n_cand == 1 else _scratch(
        (n_cand * g["TOP"],), dev, 2, torch.int64)
    tokw = torch.empty(g["KT"], device=dev, dtype=torch.int64)
    candidates[(n_cand,)](x, tok_idx, tok_val, keys, tokw, max_state, sum_state, part, window0,
                          stride_r=stride_r, stride_c=stride_c, B=batch, S=seq_len, C=channels, KT=g["KT"],
                          use_floor=int(g["KT"] == top_k), n_main=n_main,
                          KTP=g["KTP"], BLOCK_C=g["BLOCK_CB"], TOP=g["TOP"], RB=32)
    if n_cand > 1:
        keys = keys.topk(g["TOP"], sorted=False).values
    return keys, tokw


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
