"""Are two profiles of the same model and windows the same result? (a 2-GPU run against a 1-GPU run, a GPU
against a CPU, two library versions...)

    python bench/compare_profiles.py OUT_A OUT_B [--rtol 1e-3]

Each OUT is a folder that `outlierlab profile --out` (or `run`) wrote. Checked: the same massive activations
(layer, position, window, token, channel; values within ``rtol``), the same channel-wise outliers (layer,
position, channel), and every per-channel and per-token statistic array within ``rtol`` of the larger
magnitude (``atol`` = 1e-6 x the array's max). Prints the worst array and exits non-zero on a mismatch.
"""

from __future__ import annotations

import argparse
import sys

import torch


def ma_keys(report: dict) -> dict[tuple, float]:
    return {(m["layer"], m["position"], m.get("window"), m["token_index"], m["channel"]): float(m["value"])
            for m in report.get("massive_activations") or []}


def co_keys(report: dict) -> set[tuple]:
    return {(c["layer"], c["position"], c["channel"]) for c in report.get("channel_outliers") or []}


def compare(a: str, b: str, rtol: float = 1e-3) -> list[str]:
    """The differences between the profiles in folders ``a`` and ``b`` (empty: the same result)."""
    from outlierlab.tracing import load_report

    (ra, xa), (rb, xb) = load_report(a), load_report(b)
    problems = []
    ma_a, ma_b = ma_keys(ra), ma_keys(rb)
    if set(ma_a) != set(ma_b):
        problems.append(f"massive activations differ: {len(set(ma_a) - set(ma_b))} only in A, "
                        f"{len(set(ma_b) - set(ma_a))} only in B")
    bad = [k for k in set(ma_a) & set(ma_b) if abs(ma_a[k] - ma_b[k]) > rtol * max(abs(ma_a[k]), abs(ma_b[k]))]
    if bad:
        problems.append(f"{len(bad)} massive activation value(s) differ by more than {rtol:g}, e.g. {bad[0]}")
    co_a, co_b = co_keys(ra), co_keys(rb)
    if co_a != co_b:
        problems.append(f"channel-wise outliers differ: {len(co_a - co_b)} only in A, {len(co_b - co_a)} only in B")
    if set(xa) != set(xb):
        problems.append(f"statistic arrays differ: {len(set(xa) ^ set(xb))} names in one profile only")
    worst, where = 0.0, None
    for name in sorted(set(xa) & set(xb)):
        u, v = xa[name].double(), xb[name].double()
        if u.shape != v.shape:
            problems.append(f"{name}: shape {tuple(u.shape)} vs {tuple(v.shape)}")
            continue
        scale = torch.maximum(u.abs(), v.abs()) + 1e-6 * float(torch.maximum(u.abs().max(), v.abs().max()))
        err = float(((u - v).abs() / scale.clamp_min(1e-30)).max()) if u.numel() else 0.0
        if err > worst:
            worst, where = err, name
    print(f"massive activations: {len(ma_a)} vs {len(ma_b)}; channel-wise outliers: {len(co_a)} vs {len(co_b)}; "
          f"{len(set(xa) & set(xb))} statistic arrays, largest relative difference {worst:.2e}"
          + (f" ({where})" if where else ""))
    if worst > rtol:
        problems.append(f"statistics differ by {worst:.2e} > {rtol:g} at {where}")
    return problems


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("a")
    p.add_argument("b")
    p.add_argument("--rtol", type=float, default=1e-3)
    args = p.parse_args()
    problems = compare(args.a, args.b, args.rtol)
    for line in problems:
        print(f"MISMATCH: {line}")
    print("same result" if not problems else f"{len(problems)} mismatch(es)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
