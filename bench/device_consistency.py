"""Profile the same planted tiny models on the CPU and on a GPU and check that the results agree.

    python bench/device_consistency.py            # needs CUDA; exits non-zero on a mismatch

For every family: the same MAs (layer, position, token, channel), the same CO channels, and per-channel
statistics equal within float tolerance; also that profiling on the GPU left no hook and no weight changed.
"""

from __future__ import annotations

import sys

import torch


def main() -> int:
    from outlierlab.testing import TINY_FAMILIES, plant_gain, plant_super_weight, random_windows, tiny_model
    from outlierlab.tracing import ProfileConfig, profile

    if not torch.cuda.is_available():
        print("no CUDA device")
        return 2
    failures = 0
    for family in sorted(TINY_FAMILIES):
        model = tiny_model(family)
        plant_super_weight(model, 1, 7, 13, 1e5)
        plant_gain(model, 0, "attn.norm", 21, 60.0)
        ids = random_windows(model, n=6, seq_len=64)
        cfg = ProfileConfig(batch_size=3)
        cpu = profile(model, ids, cfg)
        gpu_model = model.to("cuda")
        before = {k: v.clone() for k, v in gpu_model.state_dict().items()}
        gpu = profile(gpu_model, ids, cfg)
        hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in gpu_model.modules())
        same_weights = all(torch.equal(before[k], v) for k, v in gpu_model.state_dict().items())

        def keyset(p):
            return ({(m["layer"], m["position"], m["token_index"], m["channel"]) for m in p.massive_activations},
                    {(c["layer"], c["position"], c["channel"]) for c in p.channel_outliers})

        ma_ok = keyset(cpu)[0] == keyset(gpu)[0]
        co_ok = keyset(cpu)[1] == keyset(gpu)[1]
        worst = 0.0
        for key, r in cpu.results.items():
            g = gpu.results[key].stats
            for name in ("chan_absmax", "chan_mean", "tok_absmax"):
                a, b = r.stats[name], g[name]
                worst = max(worst, float(((a - b).abs() / (a.abs() + 1e-6)).max()))
        ok = ma_ok and co_ok and worst < 1e-3 and hooks == 0 and same_weights
        failures += not ok
        print(f"{family:12s} MAs {len(cpu.massive_activations):4d} same={ma_ok}  COs {len(cpu.channel_outliers):3d} "
              f"same={co_ok}  max rel diff {worst:.2e}  hooks left {hooks}  weights unchanged {same_weights}  "
              f"{'OK' if ok else 'MISMATCH'}")
    print(f"{torch.cuda.get_device_name()} torch {torch.__version__}: {failures} mismatching families")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
