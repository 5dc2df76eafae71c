"""Where does tracing time go? torch.profiler over one profile() pass of a synthetic model (CPU or CUDA).

    python bench/trace_breakdown.py --device cuda --synthetic 7b
"""

from __future__ import annotations

import argparse

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--synthetic", default="tiny")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--n-samples", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--batch-size", type=int, default=4)
    args = ap.parse_args()
    from profile_overhead import synthetic_model
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    from outlierlab.models.loader import resolve_dtype
    from outlierlab.tracing import ProfileConfig, profile

    model, _ = synthetic_model(args.synthetic, args.device, resolve_dtype(args.dtype))
    ids = torch.randint(0, model.config.vocab_size, (args.n_samples, args.seq_len))
    cfg = ProfileConfig(batch_size=args.batch_size, weights=False)
    profile(model, ids, cfg)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device == "cuda" else [])
    with torch_profile(activities=acts) as prof:
        profile(model, ids, cfg)
    key = "self_cuda_time_total" if args.device == "cuda" else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=key, row_limit=25, max_name_column_width=60))
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15, max_name_column_width=60))


if __name__ == "__main__":
    main()
