"""The Triton source of the statistics kernels (imported only where Triton is installed; see kernels.py).

Only pointers and the window offset are runtime arguments: shapes, strides and the histogram's constants are
compile-time (a model has a handful of shapes), which keeps Triton's per-launch argument handling short.

State layout (see :class:`~outlierlab.tracing.stats.PositionStats`): ``max_state`` = [chan_absmax (C) |
tok_absmax (S)] in float32, ``sum_state`` = [chan_abssum (C) | tok_absmax_sum (S) | chan_median_sum (C) |
hist] in float64. ``part`` is a float32 scratch [2, n_rg, C] of per-row-group channel max and sum, ``rpart``
[n_cb, B * S] the row maxima of each block of channels, ``ticket`` [n_rg] int32 counters (zero between
updates: the last program of a group resets its own).
"""

import triton
import triton.language as tl

from .kernels import FLAT_BITS, WIN_BITS

_MAXF = tl.constexpr((1 << FLAT_BITS) - 1)
_WIN_BITS = tl.constexpr(WIN_BITS)


@triton.jit
def _replayed(args_ptr, XDT: tl.constexpr):
    """A graph replay's traced tensor, window offset and states, read from ``args`` (see kernels.GraphedUpdate).
    The host replays the graph only for a 16-byte aligned tensor (kernels.ALIGN): said here, or the loads lose
    their vector width (a pointer read from memory has no known alignment)."""
    x_ptr = tl.multiple_of(tl.load(args_ptr).to(tl.pointer_type(XDT)), 16)
    return (x_ptr, tl.load(args_ptr + 1), tl.load(args_ptr + 2).to(tl.pointer_type(tl.float32)),
            tl.load(args_ptr + 3).to(tl.pointer_type(tl.float64)))


@triton.jit
def _group_rows(rg, i, TB: tl.constexpr, B: tl.constexpr, S: tl.constexpr):
    """Rows ``i`` of row group ``rg`` (window-major: window i // TB, token rg * TB + i % TB) and which exist."""
    b = i // TB
    t = rg * TB + i % TB
    return b * S + t, (b < B) & (t < S)


@triton.jit
def _histogram(pid, x_ptr, hist_ptr, elem_idx_ptr, stride_r: tl.constexpr, stride_c: tl.constexpr,
               C: tl.constexpr, n_elem: tl.constexpr, lo: tl.constexpr, hi: tl.constexpr, log2_min: tl.constexpr,
               bins_per_octave: tl.constexpr, n_bins: tl.constexpr, NE: tl.constexpr):
    """log2 histogram of NE sampled elements (as torch.histc over the clamped log2 |x|)."""
    e = pid * NE + tl.arange(0, NE)
    ok = e < n_elem
    flat = tl.load(elem_idx_ptr + e, mask=ok, other=0)
    a = tl.load(x_ptr + (flat // C) * stride_r + (flat % C) * stride_c, mask=ok, other=0.0)
    a = tl.minimum(tl.maximum(tl.abs(a.to(tl.float32)), lo), hi)
    idx = ((tl.log2(a) - log2_min) * bins_per_octave).to(tl.int32)
    idx = tl.minimum(tl.maximum(idx, 0), n_bins - 1)
    tl.atomic_add(hist_ptr + idx, tl.full([NE], 1.0, tl.float64), mask=ok)


@triton.jit
def _fold_tokens(rg, max_ptr, sum_ptr, tokmax_ptr, rpart_ptr, B: tl.constexpr, S: tl.constexpr, C: tl.constexpr,
                 n_cb: tl.constexpr, BP: tl.constexpr, TB: tl.constexpr, CBF: tl.constexpr):
    """Row group ``rg``'s token statistics from every block's part of its row maxima (run by the group's last
    program, when all parts are written)."""
    rows, row_ok = _group_rows(rg, tl.arange(0, BP * TB), TB, B, S)
    rmax = tl.zeros([BP * TB], dtype=tl.float32)
    for f0 in range(0, n_cb, CBF):
        f = f0 + tl.arange(0, CBF)
        v = tl.load(rpart_ptr + f[:, None] * (B * S) + rows[None, :], mask=(f < n_cb)[:, None] & row_ok[None, :],
                    other=0.0, cache_modifier=".cg")
        rmax = tl.maximum(rmax, tl.max(v, axis=0))
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


@triton.jit
def _tile(p, x_ptr, max_ptr, sum_ptr, part_ptr, tokmax_ptr, rpart_ptr, ticket_ptr, stride_r: tl.constexpr,
          stride_c: tl.constexpr, B: tl.constexpr, S: tl.constexpr, C: tl.constexpr, n_rg: tl.constexpr,
          n_cb: tl.constexpr, BP: tl.constexpr, TB: tl.constexpr, R: tl.constexpr, BC: tl.constexpr,
          CBF: tl.constexpr, NS: tl.constexpr, EVICT: tl.constexpr):
    """Tile ``p`` = (row group, block of BC channels): the group's channel max and sum of |x| and this block's
    part of its row maxima, R rows at a time; the group's last tile to finish (a ticket) folds its tokens."""
    rg = p // n_cb
    cb = p % n_cb
    c = cb * BC + tl.arange(0, BC)
    c_ok = c < C
    col = c[None, :].to(tl.int64) * stride_c
    acc_max = tl.zeros([R, BC], dtype=tl.float32)
    acc_sum = tl.zeros([R, BC], dtype=tl.float32)
    for r0 in tl.range(0, BP * TB, R, num_stages=NS):
        rows, row_ok = _group_rows(rg, r0 + tl.arange(0, R), TB, B, S)
        # read once: with EVICT ("evict_first") its lines leave the L2 cache before the model's kernels' data
        a = tl.load(x_ptr + rows[:, None].to(tl.int64) * stride_r + col, mask=row_ok[:, None] & c_ok[None, :],
                    other=0.0, eviction_policy=EVICT)
        a = tl.abs(a.to(tl.float32))
        acc_max = tl.maximum(acc_max, a)
        acc_sum += a
        # this block's part of every row's max: plain stores, read back by the group's last tile
        tl.store(rpart_ptr + cb * (B * S) + rows, tl.max(a, axis=1), mask=row_ok)
    # per-group channel max and sum: plain stores, reduced over the groups by `candidates`
    tl.store(part_ptr + rg * C + c, tl.max(acc_max, axis=0), mask=c_ok)
    tl.store(part_ptr + (n_rg + rg) * C + c, tl.sum(acc_sum, axis=0), mask=c_ok)
    tl.debug_barrier()  # every thread's stores precede the ticket (a gpu-scope acq_rel atomic)
    if tl.atomic_add(ticket_ptr + rg, 1) == n_cb - 1:
        _fold_tokens(rg, max_ptr, sum_ptr, tokmax_ptr, rpart_ptr, B, S, C, n_cb, BP, TB, CBF)
        tl.atomic_xchg(ticket_ptr + rg, 0)  # ready for the next update


@triton.jit
def _medians(q, x_ptr, med_ptr, rows_idx_ptr, stride_r: tl.constexpr, stride_c: tl.constexpr, C: tl.constexpr,
             KR: tl.constexpr, KRP: tl.constexpr, BLOCK_M: tl.constexpr):
    """Channel medians of block ``q`` over the KR sampled rows, added to the running sums: the entry of each
    channel whose rank (ties by row) is the lower median's, found by counting instead of sorting."""
    c = q * BLOCK_M + tl.arange(0, BLOCK_M)
    c_ok = c < C
    r = tl.arange(0, KRP)
    r_ok = r < KR
    row = tl.load(rows_idx_ptr + r, mask=r_ok, other=0).to(tl.int64)
    a = tl.load(x_ptr + row[None, :] * stride_r + c[:, None].to(tl.int64) * stride_c,
                mask=c_ok[:, None] & r_ok[None, :], other=0.0)
    a = tl.where(r_ok[None, :], tl.abs(a.to(tl.float32)), float("inf"))
    before = (a[:, None, :] < a[:, :, None]) | ((a[:, None, :] == a[:, :, None]) & (r[None, None, :] < r[None, :, None]))
    rank = tl.sum(before.to(tl.int32), axis=2)
    med = tl.max(tl.where(rank == (KR - 1) // 2, a, -1.0), axis=1)
    tl.store(med_ptr + c, tl.load(med_ptr + c, mask=c_ok, other=0.0) + med.to(tl.float64), mask=c_ok)


def stats_pass(x_ptr, max_ptr, sum_ptr, part_ptr, tokmax_ptr, rows_idx_ptr, elem_idx_ptr, args_ptr, rpart_ptr,
               ticket_ptr, INDIRECT: tl.constexpr, XDT: tl.constexpr, stride_r: tl.constexpr,
               stride_c: tl.constexpr, B: tl.constexpr, S: tl.constexpr, C: tl.constexpr, KR: tl.constexpr,
               n_elem: tl.constexpr, n_hist: tl.constexpr, n_rg: tl.constexpr, n_cb: tl.constexpr,
               lo: tl.constexpr, hi: tl.constexpr, log2_min: tl.constexpr, bins_per_octave: tl.constexpr,
               n_bins: tl.constexpr, BP: tl.constexpr, TB: tl.constexpr, R: tl.constexpr, BC: tl.constexpr,
               CBF: tl.constexpr, KRP: tl.constexpr, BLOCK_M: tl.constexpr, NE: tl.constexpr, NS: tl.constexpr,
               EVICT: tl.constexpr):
    """Programs 0..n_hist-1: the histogram, NE sampled elements each; then one tile per (row group, block of BC
    channels): the group is TB tokens of every window (BP x TB rows); the rest: channel medians. With
    INDIRECT, the tensor and the states are the addresses in ``args`` (a CUDA graph replays it)."""
    if INDIRECT:
        x_ptr, _, max_ptr, sum_ptr = _replayed(args_ptr, XDT)
    pid = tl.program_id(0)
    if pid < n_hist:
        _histogram(pid, x_ptr, sum_ptr + 2 * C + S, elem_idx_ptr, stride_r, stride_c, C, n_elem, lo, hi, log2_min,
                   bins_per_octave, n_bins, NE)
    elif pid < n_hist + n_rg * n_cb:
        _tile(pid - n_hist, x_ptr, max_ptr, sum_ptr, part_ptr, tokmax_ptr, rpart_ptr, ticket_ptr, stride_r,
              stride_c, B, S, C, n_rg, n_cb, BP, TB, R, BC, CBF, NS, EVICT)
    else:
        _medians(pid - n_hist - n_rg * n_cb, x_ptr, sum_ptr + C + S, rows_idx_ptr, stride_r, stride_c, C, KR, KRP,
                 BLOCK_M)


@triton.jit
def _top_tokens(tokmax_ptr, tok_ptr, S: tl.constexpr, KT: tl.constexpr, SP: tl.constexpr, KTP: tl.constexpr,
                TZ: tl.constexpr):
    """The KT tokens with the largest max (ties to the smaller token), in token order, as a [KTP] vector (its
    last KTP - KT entries 0), and the KT-th largest max. The S maxima are read once into registers; the KT-th
    largest is found by bisection on their bits (|x| >= 0 orders like its int32 bits): the largest t with at
    least KT maxima >= t, over the multiples of 2 ** TZ (the low bits that the input dtype leaves zero in a
    float32: 16 for bfloat16, 13 for float16), 31 - TZ counting passes or fewer where a pass finds exactly KT
    maxima above its threshold; then the tokens above t and the first ties at t are written to
    ``tok_ptr`` (this program's own KTP slots) in token order and read back."""
    s = tl.arange(0, SP)
    bits = tl.load(tokmax_ptr + s, mask=s < S, other=-1.0).to(tl.int32, bitcast=True)  # padding: below any t
    # thresholds in units of 2 ** TZ (the maxima's low TZ bits are zero: they are values of the input dtype);
    # (2 ** 31 - 1) >> TZ units: no finite |x| reaches it, so fewer than KT maxima are >= hi
    lo = tl.full([], 0, tl.int32)
    hi = tl.full([], 2147483647 >> TZ, tl.int32)
    more = hi > lo
    while more:
        mid = lo + (hi - lo) // 2
        n = tl.sum((bits >= (mid << TZ)).to(tl.int32), axis=0)
        lo = tl.where(n >= KT, mid, lo)
        hi = tl.where(n >= KT, hi, mid)
        more = (hi - lo > 1) & (n != KT)  # exactly KT maxima >= mid: they are the answer, stop early
    # raised to the smallest max >= lo (after an early stop lo may lie below it): the KT-th largest max's bits.
    # Every max above it is taken, and the first ties at it up to KT
    lo = tl.min(tl.where(bits >= (lo << TZ), bits, 2147483647), axis=0)
    n_above = tl.sum((bits > lo).to(tl.int32), axis=0)
    tie = (bits == lo).to(tl.int32)
    take = (bits > lo) | ((tie != 0) & (tl.cumsum(tie, axis=0) <= KT - n_above))
    slot = tl.cumsum(take.to(tl.int32), axis=0) - 1
    tl.store(tok_ptr + slot, s, mask=take)
    tl.debug_barrier()  # the program's own stores, read back by all its threads
    j = tl.arange(0, KTP)
    return tl.load(tok_ptr + j, mask=j < KT, other=0), lo.to(tl.float32, bitcast=True)


def candidates(x_ptr, tokmax_ptr, tok_ptr, list_ptr, top_ptr, count_ptr, ticket_ptr, tokw_ptr, max_ptr, sum_ptr,
               part_ptr, window0, args_ptr, INDIRECT: tl.constexpr, XDT: tl.constexpr, stride_r: tl.constexpr,
               stride_c: tl.constexpr, B: tl.constexpr, S: tl.constexpr, C: tl.constexpr, KT: tl.constexpr,
               use_floor: tl.constexpr, n_rg: tl.constexpr, n_cand: tl.constexpr, KTP: tl.constexpr,
               BLOCK_C: tl.constexpr, TOP: tl.constexpr, RB: tl.constexpr, CAP: tl.constexpr, SP: tl.constexpr,
               RING: tl.constexpr, TZ: tl.constexpr):
    """One block of channels: fold the row groups' channel max/sum into the state, pick the KT tokens with the
    largest max over the batch (``tokmax``, written by ``stats_pass``), then append the block's best TOP
    candidate keys among them to the update's list (and, program 0, write ``tokw`` = window0 * S + token per
    slot); the last program to finish (a ticket) writes the list's best TOP to ``top`` and resets the count
    and the ticket. With INDIRECT (a graph replay), ``top`` and ``tokw`` are row ``counter % RING`` of the
    position's rings, whose addresses ``args`` holds (4: keys, 5: token slots, 6: counter), and the last
    program advances the counter."""
    if INDIRECT:  # and the outputs go to row `counter % RING` of the position's rings
        x_ptr, window0, max_ptr, sum_ptr = _replayed(args_ptr, XDT)
        counter = tl.load(args_ptr + 6).to(tl.pointer_type(tl.int64))
        ring_row = tl.load(counter) % RING
        top_ptr = tl.load(args_ptr + 4).to(tl.pointer_type(tl.int64)) + ring_row * TOP
        tokw_ptr = tl.load(args_ptr + 5).to(tl.pointer_type(tl.int64)) + ring_row * KT
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
    tok, kth = _top_tokens(tokmax_ptr, tok_ptr + pid * KTP, S, KT, SP, KTP, TZ)
    tok = tok.to(tl.int64)
    if pid == 0:  # the slots' tokens with the batch's first window folded in: window0 * S + token
        tl.store(tokw_ptr + j, tok + window0.to(tl.int64) * S, mask=j_ok)
    # with KT = top_k tokens, each one's max is a distinct key >= the smallest of them: no key below that
    # floor can be among the top_k
    if use_floor:
        floor = kth
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
        if n <= TOP:  # the list is the answer
            tl.store(top_ptr + t, tl.load(list_ptr + t, mask=t < n, other=0, cache_modifier=".cg"))
        # the usual case: a few keys above the floor besides the tokens' maxima, sorted in the shortest
        # power-of-two slots that hold them (a sort's cost grows with its slots, not with n). No sort of more
        # slots: each size is code of its own, and a sort of 1024 int64 keys was 59% of this kernel's compile
        # time (bench/RESULTS.md)
        elif n <= 2 * TOP and 2 * TOP <= CAP:
            _top_by_sort(n, list_ptr, top_ptr, TOP, 2 * TOP)
        elif n <= 8 * TOP and 8 * TOP <= CAP:
            _top_by_sort(n, list_ptr, top_ptr, TOP, 8 * TOP)
        else:  # a long list (many keys above the floor, or ties)
            _top_by_passes(n, list_ptr, top_ptr, TOP, CAP)
        tl.atomic_xchg(count_ptr, 0)  # ready for the next update
        tl.atomic_xchg(ticket_ptr, 0)
        if INDIRECT:  # every program has read the counter (before its ticket): the row is appended
            tl.store(counter, tl.load(counter) + 1)


@triton.jit
def _top_by_sort(n, list_ptr, top_ptr, TOP: tl.constexpr, CAP: tl.constexpr):
    """The best TOP of the list's ``n`` <= CAP keys: one sort of CAP slots (here CAP is 2 TOP or 8 TOP), written
    back to the list (which holds n_cand * TOP >= n keys), then its head copied."""
    e = tl.arange(0, CAP)
    ranked = tl.sort(tl.load(list_ptr + e, mask=e < n, other=0, cache_modifier=".cg"), descending=True)
    tl.store(list_ptr + e, ranked, mask=e < n)
    tl.debug_barrier()
    t = tl.arange(0, TOP)
    tl.store(top_ptr + t, tl.load(list_ptr + t))


@triton.jit
def _top_by_passes(n, list_ptr, top_ptr, TOP: tl.constexpr, CAP: tl.constexpr):
    """The best TOP of the list's ``n`` keys: TOP passes over it, CAP keys a load, each pass the largest key below
    the previous one."""
    prev = tl.full([1], 0x7FFFFFFFFFFFFFFF, tl.int64)
    for i in range(TOP):
        best = tl.zeros([1], dtype=tl.int64)
        for e0 in range(0, n, CAP):
            e = e0 + tl.arange(0, CAP)
            k = tl.load(list_ptr + e, mask=e < n, other=0, cache_modifier=".cg")
            best = tl.maximum(best, tl.max(tl.where(k < prev, k, 0), axis=0))
        tl.store(top_ptr + i + tl.arange(0, 1), best)
        prev = best


def fetch(staging_ptr, slot_ptr, args_ptr, ROWS: tl.constexpr):
    """A graph replay's first kernel: copy row ``slot % ROWS`` of the host's pinned staging rows (read through
    the unified address space, uncached: the host rewrites a row every ROWS replays) to ``args``, and advance
    ``slot``. The host writes the rows in the same order (kernels._Staging)."""
    i = tl.load(slot_ptr)
    k = tl.arange(0, 8)
    tl.store(args_ptr + k, tl.load(staging_ptr + (i % ROWS) * 8 + k, volatile=True))
    tl.store(slot_ptr, i + 1)
