"""``outlierlab explain``: why the outliers are there: MA origin, super weights verified by ablation,
propagation; CO gamma shares, OTCs, persistence. Writes report.json with an ``explain`` section."""

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

ProfileDirOpt = typer.Option(
    None, "--profile", help="reuse the profile saved in this folder (report.json + profile.safetensors)")
MaxMasOpt = typer.Option(8, "--max-mas", help="MA groups explained, largest first (0 = all)")
CandidatesOpt = typer.Option(2, "--candidates", help="super-weight candidates ablated per MA")
MaxAblationsOpt = typer.Option(4, "--max-ablations", help="ablation runs in total")
AblateOpt = typer.Option(True, "--ablate/--no-ablate", help="verify super weights by ablation")
EvalDataOpt = typer.Option("brown:eval", "--eval-data", help="text of the perplexity protocol")
EvalSamplesOpt = typer.Option(8, "--eval-samples", help="evaluation windows for perplexity")
EvalSeqLenOpt = typer.Option(512, "--eval-seq-len", help="tokens per evaluation window")
AblationWindowsOpt = typer.Option(
    2, "--ablation-windows", help="the first N evaluation windows give each ablation's perplexity (0 = all)")
CoWindowsOpt = typer.Option(2, "--co-windows", help="windows of the gain before/after sample pass")
OtcKOpt = typer.Option(10.0, "--otc-k", help="OTC rule: score above this times the median score")
MaAbsOpt = typer.Option(100.0, "--ma-abs", help="MA rule: |x| above this")
MaRelOpt = typer.Option(1000.0, "--ma-rel", help="MA rule: |x| above this times the tensor median")
CoKOpt = typer.Option(10.0, "--co-k", help="CO rule: channel median above this times the tensor median")


def _windows_from_report(prof, lm):
    """The very windows a saved profile was traced on (its data section), checked against its offsets."""
    from ..api import as_windows
    from ..data import DataConfig
    from ..errors import OutlierlabError

    d = prof.data_info or {}
    try:
        cfg = DataConfig(source=d["source"], seq_len=int(d["seq_len"]), n_samples=int(d["n_samples"]),
                         seed=int(d.get("seed", 0)), bos=d.get("bos_policy", "auto"),
                         order=d.get("order", "random"))
    except KeyError as exc:
        raise OutlierlabError(f"the saved profile does not say which data it traced ({exc} missing)") from exc
    windows = as_windows(cfg, lm)
    if d.get("starts") is not None and list(windows.starts) != list(d["starts"]):
        raise OutlierlabError("the saved profile's windows cannot be rebuilt (the text changed?): profile again")
    return windows


@app.command("explain")
@guarded
def explain_cmd(
    model: str = ModelOpt,
    data: str = DataOpt,
    out_dir: Path = OutOpt,
    seq_len: int = SeqOpt,
    n_samples: int = NOpt,
    seed: int = SeedOpt,
    bos: str = BosOpt,
    device: str = DeviceOpt,
    dtype: str = DtypeOpt,
    max_memory: str = MaxMemoryOpt,
    batch_size: int = BatchOpt,
    profile_dir: Path | None = ProfileDirOpt,
    max_mas: int = MaxMasOpt,
    candidates: int = CandidatesOpt,
    max_ablations: int = MaxAblationsOpt,
    ablate: bool = AblateOpt,
    eval_data: str = EvalDataOpt,
    eval_samples: int = EvalSamplesOpt,
    eval_seq_len: int = EvalSeqLenOpt,
    ablation_windows: int = AblationWindowsOpt,
    co_windows: int = CoWindowsOpt,
    otc_k: float = OtcKOpt,
    ma_abs: float = MaAbsOpt,
    ma_rel: float = MaRelOpt,
    co_k: float = CoKOpt,
    progress: bool = ProgressOpt,
    debug: bool = DebugOpt,
) -> None:
    """Explain every MA (origin, y6 channels, super weights verified by ablation, propagation) and CO (gamma
    share, OTCs, persistence) -> report.json with an ``explain`` section, and a narrative."""
    from ..analysis.detect import DetectConfig
    from ..analysis.explain import ExplainConfig, explain, profile_from_report
    from ..api import as_windows
    from ..data import DataConfig
    from ..errors import OutlierlabError
    from ..evaluation import EvalConfig
    from ..models.loader import load_model
    from ..tracing import ProfileConfig, StatsConfig
    from ..tracing import profile as run_profile

    t0 = time.perf_counter()
    detect = DetectConfig(ma_abs=ma_abs, ma_rel=ma_rel, co_k=co_k)
    cfg = ExplainConfig(detect=detect, batch_size=batch_size, max_mas=max_mas, max_candidates=candidates,
                        max_ablations=max_ablations, ablate=ablate, co_windows=co_windows, otc_k=otc_k,
                        ablation_windows=ablation_windows or None,
                        eval=EvalConfig(source=eval_data, n_samples=eval_samples, seq_len=eval_seq_len))
    with err.status("loading model and data"):
        lm = load_model(model, device, dtype, max_memory=max_memory)
        t_load = time.perf_counter() - t0
        prof = None
        if profile_dir is not None:
            prof = profile_from_report(profile_dir)
            sha = (prof.model_info or {}).get("sha256")
            if sha and lm.info.get("sha256") and sha != lm.info["sha256"]:
                raise OutlierlabError(f"the profile in {profile_dir} was made with another model "
                                      f"({(prof.model_info or {}).get('id')}); profile this model first")
            windows = _windows_from_report(prof, lm)
        else:
            windows = as_windows(DataConfig(source=data, seq_len=seq_len, n_samples=n_samples, seed=seed, bos=bos),
                                 lm)
    if prof is None:
        pcfg = ProfileConfig(stats=StatsConfig(seed=seed), detect=detect, batch_size=batch_size)
        prof = run_profile(lm.model, windows, pcfg, tokenizer=lm.tokenizer, progress=progress, model_info=lm.info)
    result = explain(lm, windows, cfg, profile=prof, progress=progress)
    total = time.perf_counter() - t0
    result.timings["load_s"] = t_load
    result.timings["total_s"] = total
    prof.timings["load_s"] = t_load
    prof.extra["explain"] = result.to_json()
    path = prof.save(out_dir)
    for line in result.narrative():
        out.print(line, highlight=False)
    traced = f"profile reused from {profile_dir}" if profile_dir is not None else \
        f"profile {prof.timings.get('trace_s', 0.0):.1f} s"
    out.print(f"wrote {path}; explain took {total:.1f} s in total ({traced}, ablations "
              f"{result.timings.get('ablation_s', 0.0):.1f} s)", highlight=False)
