"""Device time of the two statistics kernels per update under geometry variants (``kernels.TUNE``), each
checked against the default geometry's results, next to ``torch.amax(x, 0)`` (one read of the tensor).

    python bench/kernel_sweep.py                                  # 7B shapes at batch 4, 16 and 1 (CUDA)
    python bench/kernel_sweep.py --shapes 4x4096 --variants '{}' '{"stages": 1, "group": 256}'

A variant is a JSON dict of :data:`outlierlab.tracing.kernels.TUNE` keys (group: rows per row group; bc:
channels per tile; r: rows per step; stages: pipelined steps; warps; cand_warps; no_hist, no_med: without the
histogram's or the medians' programs, which changes the results). Times are CUPTI's
(torch.profiler, ``stats_update.device_times``) over ``--n`` direct launches.
"""

from __future__ import annotations

import argparse
import json

import torch
from stats_update import device_times

from outlierlab.tracing import kernels
from outlierlab.tracing.stats import StatsConfig, _fixed_sample

DEFAULT_VARIANTS = ['{}', '{"group": 128}', '{"group": 256}', '{"group": 1024}', '{"stages": 3}', '{"r": 8}',
                    '{"bc": 128}', '{"cand_warps": 4}']


def launch(x, batch, seq_len, state, c: StatsConfig):
    rows_idx = _fixed_sample(batch * seq_len, c.channel_median_rows, c.seed, x.device)
    elem_idx = _fixed_sample(x.numel(), c.median_samples, c.seed + 1, x.device)
    return kernels.update(x, batch, seq_len, 0, *state, rows_idx, elem_idx, c.top_k, c.log2_min, c.log2_max,
                          c.bins_per_octave)


def run_variant(tune: dict, x, batch: int, seq_len: int, n: int):
    """(the first update's states and sorted keys, {kernel: us per update}) under ``tune``."""
    kernels.TUNE.clear()
    kernels.TUNE.update(tune)
    kernels._geometry.cache_clear()
    kernels._SCRATCH.clear()
    c = StatsConfig()
    channels = x.shape[1]
    state = (torch.zeros(channels + seq_len, device=x.device),
             torch.zeros(2 * channels + seq_len + c.n_bins, device=x.device, dtype=torch.float64))
    keys, tokw = launch(x, batch, seq_len, state, c)
    first = (state[0].clone(), state[1].clone(), keys.sort(descending=True).values, tokw.clone())
    for _ in range(3):
        launch(x, batch, seq_len, state, c)
    times: dict[str, float] = {}
    for key, (us, _) in device_times(lambda: launch(x, batch, seq_len, state, c), n).items():
        for name in ("stats_pass", "candidates"):
            if name in key:
                times[name] = times.get(name, 0.0) + us
    return first, times


def same(a, b) -> bool:
    """Equal results: the maxima, keys and slots exactly, the float64 sums up to float32 summation order."""
    return (torch.equal(a[0], b[0]) and torch.allclose(a[1], b[1], rtol=1e-5, atol=1e-6)
            and torch.equal(a[2], b[2]) and torch.equal(a[3], b[3]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="4x4096,4x11008,16x4096,16x11008,1x4096",
                    help="BATCHxCHANNELS, comma-separated (windows of --seq-len tokens, bfloat16)")
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--variants", nargs="*", default=DEFAULT_VARIANTS)
    ap.add_argument("--n", type=int, default=20)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("kernel_sweep.py times CUDA kernels: no GPU here")
    gen = torch.Generator(device="cuda").manual_seed(0)
    print(f"{torch.cuda.get_device_name()} | torch {torch.__version__} | seq_len {args.seq_len}, bfloat16")
    for shape in args.shapes.split(","):
        batch, channels = (int(v) for v in shape.split("x"))
        x = torch.randn(batch * args.seq_len, channels, device="cuda", dtype=torch.bfloat16, generator=gen)
        x[5, 7] = 300.0  # one massive entry
        read = sum(us for us, _ in device_times(lambda x=x: torch.amax(x, dim=0), args.n).values())
        print(f"== batch {batch} x {args.seq_len} tokens, {channels} channels: torch.amax(x, 0) {read:.1f} us "
              f"({x.numel() * x.element_size() / read / 1e6:.2f} TB/s)", flush=True)
        base = None
        for text in args.variants:
            tune = json.loads(text)
            try:
                res, t = run_variant(tune, x, batch, args.seq_len, args.n)
            except Exception as e:  # noqa: BLE001 - a variant Triton cannot compile is reported, not fatal
                print(f"{text:40s} failed: {type(e).__name__}: {str(e).splitlines()[-1][:160]}", flush=True)
                continue
            base = base or res
            sp, cd = t.get("stats_pass", 0.0), t.get("candidates", 0.0)
            print(f"{text:40s} stats_pass {sp:7.1f} us  candidates {cd:6.1f} us  sum {sp + cd:7.1f} us  "
                  f"same as the first {same(res, base)}", flush=True)
    kernels.TUNE.clear()
    kernels._geometry.cache_clear()


if __name__ == "__main__":
    main()
