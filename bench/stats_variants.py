"""Which part of a statistics update costs what on a GPU: the update cut into cumulative variants.

    python bench/stats_variants.py            # needs CUDA

For 4 windows x 2048 tokens (8192 rows) of 4096 and 11008 channels in bf16, each variant is torch.compile'd
and timed back to back (wall), by the host time to issue it, and alone on the device (CUDA events):

- ``current fused`` / ``current eager``: :func:`outlierlab.tracing.stats._update_math` as tracing runs it;
- ``reductions only``: |x|, channel max and sum, row max, token max and sum;
- ``fusable top=none``: + channel medians by pairwise ranks and the histogram by scatter-add (no sort, no
  histc: everything inductor can fuse), no top-k;
- ``fusable top=flat``: + the top-k as tracing does it (top rows, then one top-k over their entries);
- ``fusable top=twostage``: + the top-k per candidate row first, then over the survivors.

It also checks that the fusable variant computes the same statistics as the current one.
"""

from __future__ import annotations

import time

import torch

from outlierlab.tracing.stats import StatsConfig, _fixed_sample, _update_math


def reductions(x, batch: int, seq_len: int):
    a = x.abs().float()
    chan_max, chan_sum, row_max = a.amax(0), a.sum(0), a.amax(1)
    tok = row_max.view(batch, seq_len)
    return chan_max, chan_sum, row_max, tok.amax(0), tok.sum(0)


def fusable(x, max_state, sum_state, rows_idx, elem_idx, batch, seq_len, k_rows, kk, top, lo, hi, nb, topmode):
    channels = x.shape[1]
    a = x.abs().float()
    chan_max, chan_sum, row_max = a.amax(0), a.sum(0), a.amax(1)
    tok = row_max.view(batch, seq_len)
    sub = a.index_select(0, rows_idx)  # lower median by ranks: less < k <= less-or-equal
    less = (sub.unsqueeze(0) < sub.unsqueeze(1)).sum(1)
    leq = (sub.unsqueeze(0) <= sub.unsqueeze(1)).sum(1)
    k = (k_rows + 1) // 2
    med = torch.where((less < k) & (leq >= k), sub, torch.zeros_like(sub)).amax(0)
    logs = a.reshape(-1).index_select(0, elem_idx).clamp(min=2.0 ** lo, max=2.0 ** hi * 0.999).log2()
    idx = ((logs - lo) * (nb / (hi - lo))).long().clamp(0, nb - 1)
    hist = torch.zeros(nb, device=x.device).scatter_add_(0, idx, torch.ones_like(logs))
    if topmode == "none":
        vals = signed = row_max[:top]
        rows = cols = torch.zeros(top, dtype=torch.long, device=x.device)
    else:
        cand_rows = row_max.topk(kk, sorted=False).indices
        cand = a.index_select(0, cand_rows)
        if topmode == "flat":
            vals, flat = cand.view(-1).topk(top, sorted=False)
        else:
            v1, i1 = cand.topk(min(top, channels), dim=1, sorted=False)
            vals, j = v1.view(-1).topk(top, sorted=False)
            flat = (j // v1.shape[1]) * channels + i1.view(-1)[j]
        rows, cols = cand_rows[flat // channels], flat % channels
        signed = x[rows, cols].float()
    new_max = torch.maximum(max_state, torch.cat([chan_max, tok.amax(0)]))
    new_sum = sum_state + torch.cat([chan_sum, tok.sum(0), med, hist]).double()
    return new_max, new_sum, vals, signed, rows, cols


def timed(fn, args, n: int = 30) -> tuple[float, float, float]:
    """(wall, host, device) microseconds per call."""
    for _ in range(3):
        fn(*args)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn(*args)
    host = (time.perf_counter() - t0) / n
    torch.cuda.synchronize()
    wall = (time.perf_counter() - t0) / n
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(n):
        torch.cuda.synchronize()
        start.record()
        fn(*args)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) * 1e3)
    return wall * 1e6, host * 1e6, sorted(times)[n // 2]


def main() -> None:
    dev = torch.device("cuda")
    c = StatsConfig()
    batch, seq = 4, 2048
    rows = batch * seq
    print(f"{torch.cuda.get_device_name()} | torch {torch.__version__} | {rows} rows | bfloat16 | wall/host/device us")
    for channels in (4096, 11008):
        x = torch.randn(rows, channels, device=dev, dtype=torch.bfloat16)
        x[0, 7] = 3000
        ms = torch.zeros(channels + seq, device=dev)
        ss = torch.zeros(2 * channels + seq + c.n_bins, device=dev, dtype=torch.float64)
        kk = c.top_k * batch
        common = (x, ms, ss, _fixed_sample(rows, 16, 0, dev), _fixed_sample(rows * channels, 8192, 1, dev),
                  batch, seq, 16, kk, kk, float(c.log2_min), float(c.log2_max), c.n_bins)
        runs = [("current fused", torch.compile(_update_math, dynamic=False), common),
                ("current eager", _update_math, common),
                ("reductions only", torch.compile(reductions, dynamic=False), (x, batch, seq))]
        runs += [(f"fusable top={m}", torch.compile(fusable, dynamic=False), (*common, m))
                 for m in ("none", "flat", "twostage")]
        for name, fn, args in runs:
            print(f"{channels:6d}  {name:22s}", [round(v) for v in timed(fn, args)])
        ref, got = _update_math(*common), fusable(*common, "twostage")
        print(f"{channels:6d}  fusable == current: max state {torch.equal(ref[0], got[0])}, "
              f"sums {float((ref[1] - got[1]).abs().max()):.3g}, "
              f"top values {torch.equal(ref[2].sort().values, got[2].sort().values)}")


if __name__ == "__main__":
    main()
