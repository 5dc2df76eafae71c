"""``outlierlab profile``: the operator-level profile of every decoder layer."""

from __future__ import annotations

import time
from pathlib import Path

import typer

from .common import (
    BatchOpt,
    BosOpt,
    DataOpt,
    DebugOpt,
    DeviceOpt,
    DtypeOpt,
    MaxMemoryOpt,
    ModelOpt,
    NOpt,
    OutOpt,
    ProgressOpt,
    SeedOpt,
    SeqOpt,
    app,
    err,
    guarded,
    out,
)


@app.command("profile")
@guarded
def profile_cmd(
    model: str = ModelOpt,
    data: str = DataOpt,
    out_dir: Path = OutOpt,
    seq_len: int = SeqOpt,
    n_samples: int = NOpt,
    seed: int = SeedOpt,
    bos: str = BosOpt,
    device: str = DeviceOpt,
    dtype: str = DtypeOpt,
    batch_size: int = BatchOpt,
    top_k: int = typer.Option(32, "--top-k", help="largest entries kept per layer and position"),
    ma_abs: float = typer.Option(100.0, "--ma-abs", help="MA rule: |x| above this"),
    ma_rel: float = typer.Option(1000.0, "--ma-rel", help="MA rule: |x| above this times the tensor median"),
    co_k: float = typer.Option(10.0, "--co-k", help="CO rule: channel median above this times the tensor median"),
    overlap: bool = typer.Option(
        True, "--overlap/--no-overlap",
        help="on a GPU, from 4 forwards on, run a layer's statistics on a side stream beside the next layer "
             "(holds up to two layers' activations, at most 1/8 of the free device memory)"),
    max_memory: str = MaxMemoryOpt,
    progress: bool = ProgressOpt,
    debug: bool = DebugOpt,
) -> None:
    """Operator-level profile of every decoder layer: statistics, MAs, COs, weight statistics -> report.json.

    Under torchrun (WORLD_SIZE > 1) every rank traces a shard of the windows, the statistics are merged
    across ranks, and rank 0 writes the report: ``torchrun --nproc-per-node N $(which outlierlab) profile``.
    """
    from ..analysis.detect import DetectConfig
    from ..api import as_windows
    from ..data import DataConfig
    from ..models.loader import load_model
    from ..report.terminal import print_profile_summary
    from ..tracing import ProfileConfig, StatsConfig
    from ..tracing import profile as run_profile
    from ..tracing.distributed import finish, init_from_env

    rank, world, device = init_from_env(device)
    progress = progress and rank == 0
    t0 = time.perf_counter()
    data_cfg = DataConfig(source=data, seq_len=seq_len, n_samples=n_samples, seed=seed, bos=bos)
    config = ProfileConfig(stats=StatsConfig(top_k=top_k, seed=seed, overlap=overlap),
                           detect=DetectConfig(ma_abs=ma_abs, ma_rel=ma_rel, co_k=co_k), batch_size=batch_size)
    with err.status("loading model and data"):
        lm = load_model(model, device, dtype, max_memory=max_memory)
        t_load = time.perf_counter() - t0
        windows = as_windows(data_cfg, lm)
    result = run_profile(lm.model, windows, config, tokenizer=lm.tokenizer, progress=progress, model_info=lm.info,
                         distributed=world > 1)
    result.timings["load_s"] = t_load
    result.timings["total_s"] = time.perf_counter() - t0
    if rank == 0:
        path = result.save(out_dir)
        print_profile_summary(result, out)
        ranks = f" ({world} ranks)" if world > 1 else ""
        out.print(f"wrote {path} in {result.timings['total_s']:.1f} s{ranks}")
    finish()


