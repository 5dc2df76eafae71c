"""The Triton source of the statistics kernels (imported only where Triton is installed; see kernels.py).

Only pointers and the window offset are runtime arguments: shapes, strides and the histogram's constants are
compile-time (a model has a handful of shapes), which keeps Triton's per-launch argument handling short.

State layout (see :class:`~outlierlab.tracing.stats.PositionStats`): ``max_state`` = [chan_absmax (C) |
tok_absmax (S)] in float32, ``sum_state`` = [chan_abssum (C) | tok_absmax_sum (S) | chan_median_sum (C) |
hist] in float64. ``part`` is a float32 scratch [2, n_rg, C] of per-row-group channel max and sum, ``rpart``
[n_cb, B * S] the row maxima of each block of channels, ``ticket`` [n_rg] int32 counters (zero between
updates: the last program of a group resets its own).
"""

import triton.language as tl

from .kernels import FLAT_BITS, WIN_BITS

_MAXF = tl.constexpr((1 << FLAT_BITS) - 1)
_WIN_BITS = tl.constexpr(WIN_BITS)


def stats_pass(x_ptr, max_ptr, sum_ptr, part_ptr, tokmax_ptr, rows_idx_ptr, elem_idx_ptr, args_ptr, rpart_ptr,
               ticket_ptr, INDIRECT: tl.constexpr, XDT: tl.constexpr, stride_r: tl.constexpr,
               stride_c: tl.constexpr, B: tl.constexpr, S: tl.constexpr, C: tl.constexpr, KR: tl.constexpr,
               n_elem: tl.constexpr, n_hist: tl.constexpr, n_rg: tl.constexpr, n_cb: tl.constexpr,
               lo: tl.constexpr, hi: tl.constexpr, log2_min: tl.constexpr, bins_per_octave: tl.constexpr,
               n_bins: tl.constexpr, BP: tl.constexpr, TB: tl.constexpr, R: tl.constexpr, BC: tl.constexpr,
               CBF: tl.constexpr, KRP: tl.constexpr, BLOCK_M: tl.constexpr, NE: tl.constexpr):
    """Programs 0..n_hist-1: the histogram, NE sampled elements each; then one program per (row group, block
    of BC channels): the group is TB tokens of every window (BP x TB rows), read R rows at a time; the last
    program of a row group to finish (a ticket counter) folds the group's row maxima into the token state;
    the rest: channel medians. With INDIRECT, the tensor and the states are the addresses in ``args`` (a CUDA
    graph replays it)."""
    if INDIRECT:
        x_ptr = tl.load(args_ptr).to(tl.pointer_type(XDT))
        max_ptr = tl.load(args_ptr + 2).to(tl.pointer_type(tl.float32))
        sum_ptr = tl.load(args_ptr + 3).to(tl.pointer_type(tl.float64))
    pid = tl.program_id(0)
    if pid < n_hist:
        # log2 histogram of the sampled elements (as torch.histc over the clamped log2 |x|)
        h_hist_ptr = sum_ptr + 2 * C + S
        h_e = pid * NE + tl.arange(0, NE)
        h_ok = h_e < n_elem
        h_flat = tl.load(elem_idx_ptr + h_e, mask=h_ok, other=0)
        h_a = tl.load(x_ptr + (h_flat // C) * stride_r + (h_flat % C) * stride_c, mask=h_ok, other=0.0)
        h_a = tl.minimum(tl.maximum(tl.abs(h_a.to(tl.float32)), lo), hi)
        h_idx = ((tl.log2(h_a) - log2_min) * bins_per_octave).to(tl.int32)
        h_idx = tl.minimum(tl.maximum(h_idx, 0), n_bins - 1)
        tl.atomic_add(h_hist_ptr + h_idx, tl.full([NE], 1.0, tl.float64), mask=h_ok)
    elif pid < n_hist + n_rg * n_cb:
        p = pid - n_hist
        rg = p // n_cb
        cb = p % n_cb
        c = cb * BC + tl.arange(0, BC)
        c_ok = c < C
        col = c[None, :].to(tl.int64) * stride_c
        acc_max = tl.zeros([R, BC], dtype=tl.float32)
        acc_sum = tl.zeros([R, BC], dtype=tl.float32)
        for r0 in range(0, BP * TB, R):
            # rows r0..r0+R of the group, window-major: window i // TB, token rg * TB + i % TB
            i = r0 + tl.arange(0, R)
            b = i // TB
            t = rg * TB + i % TB
            row_ok = (b < B) & (t < S)
            rows = b * S + t
            a = tl.load(x_ptr + rows[:, None].to(tl.int64) * stride_r + col, mask=row_ok[:, None] & c_ok[None, :],
                        other=0.0)
            a = tl.abs(a.to(tl.float32))
            acc_max = tl.maximum(acc_max, a)
            acc_sum += a
            # this block's part of every row's max: plain stores, read back by the group's last program
            tl.store(rpart_ptr + cb * (B * S) + rows, tl.max(a, axis=1), mask=row_ok)
        # per-group channel max and sum: plain stores, reduced over the groups by `candidates`
        tl.store(part_ptr + rg * C + c, tl.max(acc_max, axis=0), mask=c_ok)
        tl.store(part_ptr + (n_rg + rg) * C + c, tl.sum(acc_sum, axis=0), mask=c_ok)
        tl.debug_barrier()  # every thread's stores precede the ticket (a gpu-scope acq_rel atomic)
        if tl.atomic_add(ticket_ptr + rg, 1) == n_cb - 1:
            # the group's last program: every block's row maxima are written
            f_i = tl.arange(0, BP * TB)
            f_b = f_i // TB
            f_t = rg * TB + f_i % TB
            f_row_ok = (f_b < B) & (f_t < S)
            f_rows = f_b * S + f_t
            rmax = tl.zeros([BP * TB], dtype=tl.float32)
            for f0 in range(0, n_cb, CBF):
                f_f = f0 + tl.arange(0, CBF)
                f_m = (f_f < n_cb)[:, None] & f_row_ok[None, :]
                f_v = tl.load(rpart_ptr + f_f[:, None] * (B * S) + f_rows[None, :], mask=f_m, other=0.0,
                              cache_modifier=".cg")
                rmax = tl.maximum(rmax, tl.max(f_v, axis=0))
            per_window = tl.reshape(rmax, (BP, TB))
            tmax = tl.max(per_window, axis=0)
            tsum = tl.sum(per_window, axis=0)
            tt = rg * TB + tl.arange(0, TB)
            ok = tt < S
            # every group owns its tokens: plain read-modify-write of the token state
            tok_max = max_ptr + C + tt
            tok_sum = sum_ptr + C + tt
            tl.store(tok_max, tl.maximum(tl.load(tok_max, mask=ok, other=0.0), tmax), mask=ok)
            tl.store(tok_sum, tl.load(tok_sum, mask=ok, other=0.0) + tsum.to(tl.float64), mask=ok)
            tl.store(tokmax_ptr + tt, tmax, mask=ok)
            tl.atomic_xchg(ticket_ptr + rg, 0)  # ready for the next update
    else:
        # channel medians over the KR sampled rows: the entry of each channel whose rank (ties by row) is the
        # lower median's, found by counting instead of sorting
        m_c = (pid - n_hist - n_rg * n_cb) * BLOCK_M + tl.arange(0, BLOCK_M)
        m_c_ok = m_c < C
        m_r = tl.arange(0, KRP)
        m_r_ok = m_r < KR
        m_row = tl.load(rows_idx_ptr + m_r, mask=m_r_ok, other=0).to(tl.int64)
        m_a = tl.load(x_ptr + m_row[None, :] * stride_r + m_c[:, None].to(tl.int64) * stride_c,
                      mask=m_c_ok[:, None] & m_r_ok[None, :], other=0.0)
        m_a = tl.where(m_r_ok[None, :], tl.abs(m_a.to(tl.float32)), float("inf"))
        m_ai = m_a[:, :, None]
        m_aj = m_a[:, None, :]
        m_before = (m_aj < m_ai) | ((m_aj == m_ai) & (m_r[None, None, :] < m_r[None, :, None]))
        m_rank = tl.sum(m_before.to(tl.int32), axis=2)
        m_med = tl.max(tl.where(m_rank == (KR - 1) // 2, m_a, -1.0), axis=1)
        m_med_ptr = sum_ptr + C + S + m_c
        tl.store(m_med_ptr, tl.load(m_med_ptr, mask=m_c_ok, other=0.0) + m_med.to(tl.float64), mask=m_c_ok)


def candidates(x_ptr, tok_idx_ptr, tok_val_ptr, list_ptr, top_ptr, count_ptr, ticket_ptr, tokw_ptr, max_ptr, sum_ptr,
               part_ptr, window0, args_ptr, INDIRECT: tl.constexpr, XDT: tl.constexpr, stride_r: tl.constexpr,
               stride_c: tl.constexpr, B: tl.constexpr, S: tl.constexpr, C: tl.constexpr, KT: tl.constexpr,
               use_floor: tl.constexpr, n_rg: tl.constexpr, n_cand: tl.constexpr, KTP: tl.constexpr,
               BLOCK_C: tl.constexpr, TOP: tl.constexpr, RB: tl.constexpr, CAP: tl.constexpr):
    """One block of channels: fold the row groups' channel max/sum into the state, then append the block's
    best TOP candidate keys among the KT selected tokens to the update's list (and, program 0, write ``tokw`` =
    window0 * S + token per slot); the last program to finish (a ticket) writes the list's best TOP to
    ``top`` and resets the count and the ticket."""
    if INDIRECT:
        x_ptr = tl.load(args_ptr).to(tl.pointer_type(XDT))
        window0 = tl.load(args_ptr + 1)
        max_ptr = tl.load(args_ptr + 2).to(tl.pointer_type(tl.float32))
        sum_ptr = tl.load(args_ptr + 3).to(tl.pointer_type(tl.float64))
    pid = tl.program_id(0)
    cl = tl.arange(0, BLOCK_C)
    c = pid * BLOCK_C + cl
    c_ok = c < C
    # channel max and sum over the stats_pass row groups
    cmax = tl.zeros([BLOCK_C], dtype=tl.float32)
    csum = tl.zeros([BLOCK_C], dtype=tl.float32)
    for r0 in range(0, n_rg, RB):
        r = r0 + tl.arange(0, RB)
        m2 = (r < n_rg)[:, None] & c_ok[None, :]
        cmax = tl.maximum(cmax, tl.max(tl.load(part_ptr + r[:, None] * C + c[None, :], mask=m2, other=0.0), axis=0))
        csum += tl.sum(tl.load(part_ptr + (n_rg + r[:, None]) * C + c[None, :], mask=m2, other=0.0), axis=0)
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
    # append the block's best min(n_keep, TOP) keys to the update's list (an atomic count gives the offset)
    base = tl.atomic_add(count_ptr, tl.minimum(n_keep, TOP))
    if n_keep <= TOP:  # the usual case: the few entries above the floor, compacted
        flat_keep = tl.reshape(keep.to(tl.int32), (KTP * BLOCK_C,))
        slot = base + tl.cumsum(flat_keep, axis=0) - 1
        tl.store(list_ptr + slot, tl.reshape(key, (KTP * BLOCK_C,)), mask=flat_keep != 0)
    else:  # many entries above it: the TOP largest keys (all distinct), one max at a time
        for i in range(TOP):
            best_key = tl.max(tl.max(key, axis=1), axis=0)
            tl.store(list_ptr + base + i, best_key)
            key = tl.where(key == best_key, 0, key)
    tl.debug_barrier()  # every thread's stores precede the ticket (a gpu-scope acq_rel atomic)
    if tl.atomic_add(ticket_ptr, 1) == n_cand - 1:
        # the last program: the update's best TOP keys of the list into ``top`` (keys are distinct, 0 = empty)
        n = tl.atomic_add(count_ptr, 0)
        t = tl.arange(0, TOP)
        if n <= TOP:  # the usual case: the list is the answer
            tl.store(top_ptr + t, tl.load(list_ptr + t, mask=t < n, other=0, cache_modifier=".cg"))
        elif n <= CAP:
            s_e = tl.arange(0, CAP)
            ranked = tl.sort(tl.load(list_ptr + s_e, mask=s_e < n, other=0, cache_modifier=".cg"),
                             descending=True)
            tl.store(list_ptr + s_e, ranked, mask=s_e < n)  # the list holds n_cand * TOP >= n keys
            tl.debug_barrier()
            tl.store(top_ptr + t, tl.load(list_ptr + t))
        else:  # a long list (ties above the floor): TOP passes, each the largest key below the previous one
            # (names of their own in each branch: the compiler merges same-named values of both branches)
            p_prev = tl.full([1], 0x7FFFFFFFFFFFFFFF, tl.int64)
            for p_i in range(TOP):
                p_max = tl.zeros([1], dtype=tl.int64)
                for p_e0 in range(0, n, CAP):
                    p_e = p_e0 + tl.arange(0, CAP)
                    p_k = tl.load(list_ptr + p_e, mask=p_e < n, other=0, cache_modifier=".cg")
                    p_max = tl.maximum(p_max, tl.max(tl.where(p_k < p_prev, p_k, 0), axis=0))
                tl.store(top_ptr + p_i + tl.arange(0, 1), p_max)
                p_prev = p_max
        tl.atomic_xchg(count_ptr, 0)  # ready for the next update
        tl.atomic_xchg(ticket_ptr, 0)


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
