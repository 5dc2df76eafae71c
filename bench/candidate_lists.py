"""How long the GPU candidates kernel's key lists are on a real model: which of its rankings each update takes.

    python bench/candidate_lists.py                          # the default model, 4 x 512 tokens of Brown, batch 4
    python bench/candidate_lists.py --batch-size 1 --n-samples 4

The kernel's last program ranks the update's candidate keys: per block of channels, the entries at or above the
token floor (the top_k-th largest token max over the batch) among the top_k tokens, at most TOP a block
(tracing/triton_src.py). A list of up to 2 TOP keys is sorted in 2 TOP slots, up to 8 TOP in 8 TOP slots, longer
ones are ranked otherwise. This counts, on the CPU, every update's list length as the kernel computes it
(kernels.list_length), from the tensors a profile traces, and prints how many updates fall in each range, per
position too.
"""

from __future__ import annotations

import argparse
import collections

from outlierlab.api import as_loaded, as_windows
from outlierlab.data import DataConfig
from outlierlab.tracing import ProfileConfig, StatsConfig, kernels, profile
from outlierlab.tracing.stats import PositionStats


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--data", default="brown:calib")
    ap.add_argument("--n-samples", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=4)
    args = ap.parse_args()

    lm = as_loaded(args.model)
    windows = as_windows(args.data, lm, DataConfig(n_samples=args.n_samples, seq_len=args.seq_len))
    top_k = StatsConfig().top_k
    top = kernels._geometry(args.batch_size, args.seq_len, 64, top_k)["TOP"]
    lengths: dict[str, list[int]] = collections.defaultdict(list)
    real = PositionStats.update

    def update(self, x, window0=0):
        if x.dim() >= 3:
            lengths[self.key[1]].append(kernels.list_length(x.reshape(x.shape[0], x.shape[1], -1), top_k))
        return real(self, x, window0)

    PositionStats.update = update
    try:
        profile(lm.model, windows, ProfileConfig(batch_size=args.batch_size, weights=False))
    finally:
        PositionStats.update = real
    ranges = ((0, 2 * top), (2 * top, 8 * top), (8 * top, 32 * top), (32 * top, None))

    def row(values: list[int]) -> str:
        return ", ".join(f"{lo + 1}-{hi if hi else ''}: {sum(lo < n and (hi is None or n <= hi) for n in values)}"
                         for lo, hi in ranges)

    every = [n for v in lengths.values() for n in v]
    print(f"{args.model} | {args.n_samples} x {args.seq_len} tokens, batch {args.batch_size} | TOP {top}")
    print(f"all {len(every)} updates, by list length: {row(every)}")
    for name, v in sorted(lengths.items()):
        print(f"  {name:14s} longest {max(v):5d}, median {sorted(v)[len(v) // 2]:5d} | {row(v)}")


if __name__ == "__main__":
    main()
