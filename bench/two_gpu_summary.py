"""The numbers of bench/two_gpu.sh, printed from the files its runs left in its work folder.

    python bench/two_gpu_summary.py times WORK T0 T1 T2   # wall times of the 1-device and 2-rank profiles
    python bench/two_gpu_summary.py run WORK              # per-stage seconds and peak memory per GPU
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def times(work: Path, t0: float, t1: float, t2: float) -> None:
    one, two = t1 - t0, t2 - t1
    timing = {k: json.loads((work / k / "report.json").read_text()).get("timings", {}) for k in ("one", "two")}
    print(f"wall: 1 device {one:.1f} s, 2 ranks {two:.1f} s, ratio {two / one:.3f} (target <= 0.55)")
    print(f"profile timings: 1 device {timing['one']}; 2 ranks {timing['two']}")


def run(work: Path) -> None:
    stages = json.loads((work / "run" / "stages.json").read_text())
    print("stages (s):", {k: v["seconds"] for k, v in stages.items()})
    peak: dict[str, int] = {}
    mem = work / "mem.csv"
    for line in mem.read_text().splitlines() if mem.is_file() else []:
        parts = [p.strip() for p in line.split(",")]
        if len(parts) == 2 and parts[1].isdigit():
            peak[parts[0]] = max(peak.get(parts[0], 0), int(parts[1]))
    print("peak memory used per GPU (MiB, nvidia-smi):", peak or "no GPU")


if __name__ == "__main__":
    what, work = sys.argv[1], Path(sys.argv[2])
    if what == "times":
        times(work, *map(float, sys.argv[3:6]))
    else:
        run(work)
