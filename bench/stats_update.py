"""Cost of one statistics update (:meth:`PositionStats.update`) per traced tensor, on CPU or GPU.

    python bench/stats_update.py --device cuda --dtype bfloat16 --rows 8192 --channels 4096,11008

For each shape and compile mode it prints, per update: the wall time when updates are issued back to back
(what tracing pays), the host time to issue one update (launch cost; on a GPU the work is asynchronous), and
the device time of one update measured alone (CUDA events). If the host time exceeds the device time, tracing
is launch-bound: the GPU waits for the CPU. ``--kernels`` adds, per shape, the device time of each kernel of
an update (torch.profiler over ``--n`` updates, with plain launches and with graph replays).
"""

from __future__ import annotations

import argparse
import time

import torch

from outlierlab.models.loader import resolve_device, resolve_dtype
from outlierlab.tracing.stats import PositionStats, StatsConfig


def measure(x: torch.Tensor, mode: str, n: int, batch: int) -> dict:
    dev = x.device
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    st = PositionStats(StatsConfig(compile=mode))
    x = x.view(batch, -1, x.shape[-1])
    # compile and warm up, through one merge of the candidates (every merge_every updates): its first run loads
    # kernels the updates do not use (lazily, on CUDA), which would land in the timed loop of the first shape
    for _ in range(st.config.merge_every + 1):
        st.update(x)
    sync()
    t0 = time.perf_counter()
    for _ in range(n):
        st.update(x)
    host = (time.perf_counter() - t0) / n
    sync()
    wall = (time.perf_counter() - t0) / n
    device = float("nan")
    if dev.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        times = []
        for _ in range(n):
            sync()
            start.record()
            st.update(x)
            end.record()
            sync()
            times.append(start.elapsed_time(end) / 1e3)
        device = sorted(times)[len(times) // 2]
    return {"wall": wall, "host": host, "device": device}


def device_times(fn, n: int) -> dict[str, tuple[float, float]]:
    """Per kernel name, (device us, launches) per call of ``fn``, over ``n`` calls after the device is idle, as
    CUPTI reports them (torch.profiler; a replayed CUDA graph's kernels included)."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(n):
            fn()
        torch.cuda.synchronize()
    return {e.key: (e.device_time_total / n, e.count / n) for e in prof.key_averages() if e.device_time_total > 0}


def kernel_times(x: torch.Tensor, n: int, batch: int, mode: str) -> None:
    """Device time per update of every kernel an update launches (mode ``triton``: plain launches; ``graphs``:
    the kernels of the replayed CUDA graph, as CUPTI reports them)."""
    st = PositionStats(StatsConfig(compile=mode))
    x = x.view(batch, -1, x.shape[-1])
    for _ in range(3):
        st.update(x)
    times = device_times(lambda: st.update(x), n)
    for name, (us, calls) in sorted(times.items(), key=lambda r: -r[1][0]):
        print(f"    {us:8.1f} us  x{calls:4.1f}  {name[:90]}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--rows", type=int, default=2048, help="batch x tokens per update")
    ap.add_argument("--batch", type=int, default=4, help="windows per update (rows = batch x tokens)")
    ap.add_argument("--channels", default="576,1536")
    ap.add_argument("--modes", default="auto")
    ap.add_argument("--n", type=int, default=50)
    ap.add_argument("--kernels", action="store_true", help="device time per kernel of an update (CUDA)")
    args = ap.parse_args()
    device, dtype = resolve_device(args.device), resolve_dtype(args.dtype)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    print(f"{where} | torch {torch.__version__} | {args.rows} rows ({args.batch} windows) | {args.dtype}")
    gen = torch.Generator().manual_seed(0)
    for c in (int(v) for v in args.channels.split(",")):
        x = torch.randn(args.rows, c, generator=gen).to(device=device, dtype=dtype)
        x[0, 7] = 3000.0  # one massive entry, as real traces have
        bytes_ = x.numel() * x.element_size()
        for mode in args.modes.split(","):
            r = measure(x, mode, args.n, args.batch)
            print(f"channels {c:6d}  {mode:6s}  wall {r['wall'] * 1e6:8.1f} us  host {r['host'] * 1e6:8.1f} us  "
                  f"device {r['device'] * 1e6:8.1f} us  (one read of x at 3 TB/s: {bytes_ / 3e12 * 1e6:.1f} us)")
        if args.kernels and device.type == "cuda":
            for mode in ("triton", "graphs"):
                print(f"  kernels of one update, {c} channels, mode {mode} (device time per update):")
                kernel_times(x, args.n, args.batch, mode)


if __name__ == "__main__":
    main()
