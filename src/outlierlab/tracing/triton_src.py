"""The Triton source of the statistics kernels (imported only where Triton is installed; see kernels.py).

Only pointers and the window offset are runtime arguments: shapes, strides and the histogram's constants are
compile-time (a model has a handful of shapes), which keeps Triton's per-launch argument handling short.

State layout (see :class:`~outlierlab.tracing.stats.PositionStats`): ``max_state`` = [chan_absmax (C) |
tok_absmax (S)] in float32, ``sum_state`` = [chan_abssum (C) | tok_absmax_sum (S) | chan_median_sum (C) |
hist] in float64. ``part`` is a float32 scratch [2, n_main, C] of per-program channel max and sum.
"""

import triton.language as tl

from .kernels import FLAT_BITS, WIN_BITS

_MAXF = tl.constexpr((1 << FLAT_BITS) - 1)
_WIN_BITS = tl.constexpr(WIN_BITS)


def stats_pass(x_ptr, max_ptr, sum_ptr, part_ptr, tokmax_ptr, rows_idx_ptr, elem_idx_ptr, args_ptr,
               INDIRECT: tl.constexpr, XDT: tl.constexpr, stride_r: tl.constexpr, stride_c: tl.constexpr, B: tl.constexpr, S: tl.constexpr, C: tl.constexpr,
               KR: tl.constexpr, n_elem: tl.constexpr, n_main: tl.constexpr, lo: tl.constexpr, hi: tl.constexpr,
               log2_min: tl.constexpr, bins_per_octave: tl.constexpr, n_bins: tl.constexpr,
               BP: tl.constexpr, BT: tl.constexpr, BLOCK_C: tl.constexpr, KRP: tl.constexpr,
               BLOCK_M: tl.constexpr, NE: tl.constexpr):
    """Program 0: the histogram; 1..n_main: BT tokens of every window; the rest: channel medians. With
    INDIRECT, the tensor and the states are the addresses in ``args`` (a CUDA graph replays it)."""
    if INDIRECT:
        x_ptr = tl.load(args_ptr).to(tl.pointer_type(XDT))
        max_ptr = tl.load(args_ptr + 2).to(tl.pointer_type(tl.float32))
        sum_ptr = tl.load(args_ptr + 3).to(tl.pointer_type(tl.float64))
    pid = tl.program_id(0)
    if pid == 0:
        # log2 histogram of the sampled elements (as torch.histc over the clamped log2 |x|)
        hist_ptr = sum_ptr + 2 * C + S
        for e0 in range(0, n_elem, NE):
            e = e0 + tl.arange(0, NE)
            ok = e < n_elem
            flat = tl.load(elem_idx_ptr + e, mask=ok, other=0)
            a = tl.load(x_ptr + (flat // C) * stride_r + (flat % C) * stride_c, mask=ok, other=0.0)
            a = tl.minimum(tl.maximum(tl.abs(a.to(tl.float32)), lo), hi)
            idx = ((tl.log2(a) - log2_min) * bins_per_octave).to(tl.int32)
            idx = tl.minimum(tl.maximum(idx, 0), n_bins - 1)
            tl.atomic_add(hist_ptr + idx, tl.full([NE], 1.0, tl.float64), mask=ok)
    elif pid <= n_main:
        p = pid - 1
        # rows of BT tokens in every window of the batch: [BP * BT] rows, b-major
        i = tl.arange(0, BP * BT)
        b = i // BT
        t = p * BT + i % BT
        row_ok = (b < B) & (t < S)
        rows = (b * S + t).to(tl.int64)
        rmax = tl.zeros([BP * BT], dtype=tl.float32)
        for c0 in range(0, C, BLOCK_C):
            c = c0 + tl.arange(0, BLOCK_C)
            c_ok = c < C
            a = tl.load(x_ptr + rows[:, None] * stride_r + c[None, :].to(tl.int64) * stride_c,
                        mask=row_ok[:, None] & c_ok[None, :], other=0.0)
            a = tl.abs(a.to(tl.float32))
            # per-program channel max and sum: plain stores, reduced over the programs by `candidates`
            tl.store(part_ptr + p * C + c, tl.max(a, axis=0), mask=c_ok)
            tl.store(part_ptr + (n_main + p) * C + c, tl.sum(a, axis=0), mask=c_ok)
            rmax = tl.maximum(rmax, tl.max(a, axis=1))
        per_window = tl.reshape(rmax, (BP, BT))
        tmax = tl.max(per_window, axis=0)
        tsum = tl.sum(per_window, axis=0)
        tt = p * BT + tl.arange(0, BT)
        ok = tt < S
        # every program owns its tokens: plain read-modify-write of the token state
        tok_max = max_ptr + C + tt
        tok_sum = sum_ptr + C + tt
        tl.store(tok_max, tl.maximum(tl.load(tok_max, mask=ok, other=0.0), tmax), mask=ok)
        tl.store(tok_sum, tl.load(tok_sum, mask=ok, other=0.0) + tsum.to(tl.float64), mask=ok)
        tl.store(tokmax_ptr + tt, tmax, mask=ok)
    else:
        # channel medians over the KR sampled rows: the entry of each channel whose rank (ties by row) is the
        # lower median's, found by counting instead of sorting
        c = (pid - n_main - 1) * BLOCK_M + tl.arange(0, BLOCK_M)
        c_ok = c < C
        r = tl.arange(0, KRP)
        r_ok = r < KR
        row = tl.load(rows_idx_ptr + r, mask=r_ok, other=0).to(tl.int64)
        a = tl.load(x_ptr + row[None, :] * stride_r + c[:, None].to(tl.int64) * stride_c,
                    mask=c_ok[:, None] & r_ok[None, :], other=0.0)
        a = tl.where(r_ok[None, :], tl.abs(a.to(tl.float32)), float("inf"))
        ai = a[:, :, None]
        aj = a[:, None, :]
        before = (aj < ai) | ((aj == ai) & (r[None, None, :] < r[None, :, None]))
        rank = tl.sum(before.to(tl.int32), axis=2)
        med = tl.max(tl.where(rank == (KR - 1) // 2, a, -1.0), axis=1)
        med_ptr = sum_ptr + C + S + c
        tl.store(med_ptr, tl.load(med_ptr, mask=c_ok, other=0.0) + med.to(tl.float64), mask=c_ok)


def candidates(x_ptr, tok_idx_ptr, tok_val_ptr, keys_ptr, tokw_ptr, max_ptr, sum_ptr, part_ptr, window0, args_ptr,
               INDIRECT: tl.constexpr, XDT: tl.constexpr, stride_r: tl.constexpr, stride_c: tl.constexpr, B: tl.constexpr, S: tl.constexpr, C: tl.constexpr,
               KT: tl.constexpr, use_floor: tl.constexpr, n_main: tl.constexpr,
               KTP: tl.constexpr, BLOCK_C: tl.constexpr, TOP: tl.constexpr, RB: tl.constexpr):
    """One block of channels: fold the programs' channel max/sum into the state, then write the block's best
    TOP candidate keys among the KT selected tokens (and, program 0, ``tokw`` = window0 * S + token per slot)."""
    if INDIRECT:
        x_ptr = tl.load(args_ptr).to(tl.pointer_type(XDT))
        window0 = tl.load(args_ptr + 1)
        max_ptr = tl.load(args_ptr + 2).to(tl.pointer_type(tl.float32))
        sum_ptr = tl.load(args_ptr + 3).to(tl.pointer_type(tl.float64))
    pid = tl.program_id(0)
    cl = tl.arange(0, BLOCK_C)
    c = pid * BLOCK_C + cl
    c_ok = c < C
    # channel max and sum over the stats_pass programs
    cmax = tl.zeros([BLOCK_C], dtype=tl.float32)
    csum = tl.zeros([BLOCK_C], dtype=tl.float32)
    for r0 in range(0, n_main, RB):
        r = r0 + tl.arange(0, RB)
        m2 = (r < n_main)[:, None] & c_ok[None, :]
        cmax = tl.maximum(cmax, tl.max(tl.load(part_ptr + r[:, None] * C + c[None, :], mask=m2, other=0.0), axis=0))
        csum += tl.sum(tl.load(part_ptr + (n_main + r[:, None]) * C + c[None, :], mask=m2, other=0.0), axis=0)
    tl.store(max_ptr + c, tl.maximum(tl.load(max_ptr + c, mask=c_ok, other=0.0), cmax), mask=c_ok)
    tl.store(sum_ptr + c, tl.load(sum_ptr + c, mask=c_ok, other=0.0) + csum.to(tl.float64), mask=c_ok)

    j = tl.arange(0, KTP)
    j_ok = j < KT
    tok = tl.load(tok_idx_ptr + j, mask=j_ok, other=0).to(tl.int64)
    if pid == 0:  # the slots' tokens with the batch's first window folded in: window0 * S + token
        tl.store(tokw_ptr + j, tok + window0.to(tl.int64) * S, mask=j_ok)
    # with KT = top_k tokens, each one's max is a distinct key >= the smallest of them: no key below that
    # floor can be among the top_k
    if use_floor:
        floor = tl.min(tl.load(tok_val_ptr + j, mask=j_ok, other=float("inf")), axis=0)
    else:
        floor = 0.0
    m = j_ok[:, None] & c_ok[None, :]
    col = c[None, :].to(tl.int64) * stride_c
    best = tl.full([KTP, BLOCK_C], -1.0, tl.float32)
    val = tl.zeros([KTP, BLOCK_C], dtype=tl.float32)
    win = tl.zeros([KTP, BLOCK_C], dtype=tl.int64)
    for b in range(B):
        v = tl.load(x_ptr + (b * S + tok)[:, None] * stride_r + col, mask=m, other=0.0).to(tl.float32)
        a = tl.where(m, tl.abs(v), -1.0)
        take = a > best  # strict: the first (smallest) window wins ties
        best = tl.where(take, a, best)
        val = tl.where(take, v, val)
        win = tl.where(take, b, win)
    flat = j[:, None].to(tl.int64) * C + c[None, :]
    bits = best.to(tl.int32, bitcast=True).to(tl.int64)
    key = ((bits + 1) << 31) | ((_MAXF - flat) << (_WIN_BITS + 1)) | (win << 1) | (val < 0).to(tl.int64)
    keep = best >= floor
    key = tl.where(keep, key, 0)
    n_keep = tl.sum(tl.sum(keep.to(tl.int32), axis=1), axis=0)
    out = keys_ptr + pid * TOP
    if n_keep <= TOP:  # the usual case: compact the few entries above the floor into the TOP slots
        tl.store(out + tl.arange(0, TOP), tl.zeros([TOP], dtype=tl.int64))
        tl.debug_barrier()
        flat_keep = tl.reshape(keep.to(tl.int32), (KTP * BLOCK_C,))
        slot = tl.cumsum(flat_keep, axis=0) - 1
        tl.store(out + slot, tl.reshape(key, (KTP * BLOCK_C,)), mask=flat_keep != 0)
    else:  # many entries above it: the TOP largest keys (all distinct), one max at a time
        for i in range(TOP):
            best_key = tl.max(tl.max(key, axis=1), axis=0)
            tl.store(out + i, best_key)
            key = tl.where(key == best_key, 0, key)


def stash(args_ptr, keys_ptr, tokw_ptr, TOP: tl.constexpr, KT: tl.constexpr, KTP: tl.constexpr, R: tl.constexpr):
    """Copy an update's keys and token slots into row ``counter % R`` of the position's rings (addresses in
    ``args``: 4 keys ring, 5 token-slot ring, 6 counter) and advance the counter."""
    ring_keys = tl.load(args_ptr + 4).to(tl.pointer_type(tl.int64))
    ring_tokw = tl.load(args_ptr + 5).to(tl.pointer_type(tl.int64))
    counter = tl.load(args_ptr + 6).to(tl.pointer_type(tl.int64))
    n = tl.load(counter)
    slot = n % R
    t = tl.arange(0, TOP)
    tl.store(ring_keys + slot * TOP + t, tl.load(keys_ptr + t))
    j = tl.arange(0, KTP)
    tl.store(ring_tokw + slot * KT + j, tl.load(tokw_ptr + j, mask=j < KT), mask=j < KT)
    tl.debug_barrier()
    tl.store(counter, n + 1)
