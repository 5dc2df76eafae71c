"""The whole study in one call: profile -> explain -> mitigate -> compare -> report.

Every stage writes into one output folder and records, in ``stages.json``, a key made from its configuration,
the model's content hash and the keys of the stages it reads. A re-run skips each stage whose key and outputs
are unchanged, so an interrupted run resumes where it stopped (compare also caches each cell on its own).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console

from .data import DataConfig
from .errors import OutlierlabError
from .evaluation import EvalConfig
from .paths import atomic_write_json

STAGES = ("profile", "explain", "mitigate", "compare", "report")
#: every method and preset (``outlierlab run --methods all --quant all``); about 40 cells, over 30 min on 2 CPU cores
FULL_METHODS = ("none", "smoothquant", "rotate", "prefix", "tma", "gamma", "otc", "paper")
FULL_QUANTS = ("fp", "w8a8-tensor", "w8a8-token", "w4a8", "w4a4")
#: the default matrix of README's main command: the study's method against the two main baselines under the
#: activation quantizations that outliers decide (static per-tensor, dynamic per-token W8A8); 4-bit weights
#: (``w4a8``, ``w4a4``: a question of the weights, where RTN leaves no method ahead) come with ``--quant all``.
#: Sized for a run of about 3 minutes on 2 CPU cores (README has the measurements)
DEFAULT_METHODS = ("none", "smoothquant", "rotate", "paper")
DEFAULT_QUANTS = ("fp", "w8a8-tensor", "w8a8-token")


@dataclass(frozen=True)
class RunConfig:
    model: str = "smollm2-135m"
    device: str = "cpu"
    dtype: str = "float32"
    #: accelerate placement budget (``0=15GiB,cpu=60GiB``): what does not fit is offloaded (None: all on device)
    max_memory: str | None = None
    calib: DataConfig = field(default_factory=DataConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    batch_size: int = 4
    #: the mitigation shown before/after in the report (the study's recommended combination)
    recommended: str = "paper"
    methods: tuple[str, ...] = DEFAULT_METHODS
    quants: tuple[str, ...] = DEFAULT_QUANTS
    explain_ablations: int = 6


def quick_config(**overrides) -> RunConfig:
    """A first look (and CI): 4 calibration windows of 256 tokens, 2 evaluation windows, a small matrix."""
    base = dict(calib=DataConfig(seq_len=256, n_samples=4), eval=EvalConfig(seq_len=256, n_samples=2),
                methods=("none", "smoothquant", "paper"), quants=("fp", "w8a8-tensor", "w8a8-token"),
                explain_ablations=2)
    base.update(overrides)
    return RunConfig(**base)


def _key(*parts) -> str:
    blob = json.dumps([dataclasses.asdict(p) if dataclasses.is_dataclass(p) else p for p in parts],
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


class StageLog:
    """``stages.json``: per stage its key, its seconds, and whether this run computed or reused it."""

    def __init__(self, out_dir: Path):
        self.path = out_dir / "stages.json"
        self.data = json.loads(self.path.read_text()) if self.path.is_file() else {}

    def fresh(self, stage: str, key: str, outputs: list[Path]) -> bool:
        entry = self.data.get(stage)
        return bool(entry and entry.get("key") == key and all(p.exists() for p in outputs))

    def done(self, stage: str, key: str, seconds: float) -> None:
        self.data[stage] = {"key": key, "seconds": round(seconds, 2)}
        atomic_write_json(self.path, self.data)

    def seconds(self) -> dict[str, float]:
        return {s: self.data[s]["seconds"] for s in STAGES if s in self.data}

    def estimate(self, stages: tuple[str, ...]) -> float | None:
        """Seconds ``stages`` took when last computed (the previous run's timings); None if one never ran."""
        known = self.seconds()
        return sum(known[s] for s in stages) if all(s in known for s in stages) else None


def planned_tokens(config: RunConfig, logits_cost: float, ablation_windows: int) -> dict[str, float]:
    """Tokens each stage will run through the model, a token whose logits are computed counting
    ``logits_cost`` times one without: a rough plan (calibrations of the quantized cells and the tracing
    left out) that, scaled by the seconds per token of the last stage that ran, estimates a first run."""
    ev, cal = config.eval.n_samples * config.eval.seq_len, config.calib.n_samples * config.calib.seq_len
    q, m = len(config.quants), len(config.methods)
    row = q if config.recommended in config.methods else 1  # the recommended method's cells come with mitigate
    return {"profile": float(cal),
            "explain": (config.explain_ablations + 1) * min(ablation_windows, config.eval.n_samples)
            * config.eval.seq_len * logits_cost,
            "mitigate": (1 + row) * ev * logits_cost,  # before, after and the quantized cells of the row
            "compare": max(m * q - 1 - row, 0) * ev * logits_cost,
            "report": 0.0}


def logits_cost(model) -> float:
    """What a token costs with its logits over one without: 1 + output layer / decoder layers (parameters)."""
    from .adapters import get_adapter

    head = getattr(getattr(model, "get_output_embeddings", lambda: None)(), "weight", None)
    layers = sum(p.numel() for p in get_adapter(model).layers().parameters())
    return 1.0 + (head.numel() / layers if head is not None and layers else 0.0)


def _update_report(out_dir: Path, section: str, value) -> None:
    path = out_dir / "report.json"
    report = json.loads(path.read_text())
    report[section] = value
    atomic_write_json(path, report)


def run(config: RunConfig, out_dir: str | Path, console: Console | None = None, progress: bool = True,
        on_stage: Callable[[str, str], None] | None = None) -> dict:
    """Run (or resume) the pipeline into ``out_dir``; returns ``{stage: seconds}`` and the report path."""
    from .analysis.explain import ExplainConfig, explain, profile_from_report
    from .api import as_windows
    from .evaluation import eval_windows
    from .evaluation.compare import CompareConfig, compare, render_table
    from .fmt import duration
    from .mitigation.measure import MeasureConfig, measure, reduction
    from .models.loader import load_model, max_positions
    from .report import landscape
    from .report.html import build_report
    from .report.summary import summary_lines
    from .report.terminal import print_profile_summary
    from .tracing import ProfileConfig, profile

    console = console or Console()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    log = StageLog(out)
    t_all = time.perf_counter()

    plan: dict[str, float] = {}

    def header(stage: str, state: str) -> None:
        i = STAGES.index(stage)
        remaining = STAGES[i + (state == "(cached)"):]
        left = log.estimate(remaining)
        eta = f"about {duration(left)} left" if left is not None else "no estimate (no previous run's timings)"
        tokens, known = sum(plan.get(s, 0.0) for s in remaining), log.seconds()
        timed = [s for s in STAGES[:i] if plan.get(s) and s in known]
        if left is None and tokens and timed:  # a first run: at the speed of the last stage that ran forwards
            last = timed[-1]
            left = known[last] / plan[last] * tokens
            eta = f"about {duration(left)} left (first run: the remaining forwards at the {last} stage's speed)"
        name = f"[bold]stage {i + 1}/{len(STAGES)} {stage}[/]" + (f" {state}" if state else "")
        console.rule(name)
        console.print(f"  {duration(time.perf_counter() - t_all)} elapsed, {eta}")
        if on_stage:
            on_stage(stage, state)

    t0 = time.perf_counter()
    lm = load_model(config.model, config.device, config.dtype, max_memory=config.max_memory)
    console.print(f"model {lm.info['id']} ({lm.info['model_type']}, {lm.info['n_layers']} layers) loaded in "
                  f"{time.perf_counter() - t0:.1f} s")
    calib = as_windows(config.calib, lm)
    ev = eval_windows(lm.tokenizer, config.eval, max_positions=max_positions(lm.model))
    model_id = lm.info.get("sha256") or lm.info["id"]
    plan.update(planned_tokens(config, logits_cost(lm.model),
                               ExplainConfig.ablation_windows or config.eval.n_samples))

    # -- profile ------------------------------------------------------------------------------------
    pconf = ProfileConfig(batch_size=config.batch_size)
    k_profile = _key("profile", model_id, config.dtype, config.calib, pconf)
    if log.fresh("profile", k_profile, [out / "report.json", out / "profile.safetensors"]):
        header("profile", "(cached)")
        prof = profile_from_report(out)
    else:
        header("profile", "")
        t0 = time.perf_counter()
        prof = profile(lm.model, calib, pconf, tokenizer=lm.tokenizer, progress=progress, model_info=lm.info)
        prof.save(out)
        print_profile_summary(prof, console)
        log.done("profile", k_profile, time.perf_counter() - t0)

    # -- explain ------------------------------------------------------------------------------------
    econf = ExplainConfig(batch_size=config.batch_size, eval=config.eval, max_ablations=config.explain_ablations)
    k_explain = _key("explain", k_profile, econf)
    if log.fresh("explain", k_explain, [out / "report.json"]) and "explain" in json.loads(
            (out / "report.json").read_text()):
        header("explain", "(cached)")
    else:
        header("explain", "")
        t0 = time.perf_counter()
        exp = explain(lm, calib, econf, profile=prof, eval_windows=ev, progress=progress)
        section = exp.to_json()
        section["narrative"] = exp.narrative()
        _update_report(out, "explain", section)
        for line in section["narrative"]:
            console.print(f"  {line}")
        log.done("explain", k_explain, time.perf_counter() - t0)

    # -- mitigate (the recommended method, before/after, landscapes, its compare cells) ------------------
    # the recommended method is applied once, inside compare's run of its cells: the before/after
    # measurements give the none/fp and recommended/fp cells, and compare (stage 4) finds its cells cached
    cconf = CompareConfig(methods=config.methods, quants=config.quants, eval=config.eval, calib=config.calib,
                          batch_size=config.batch_size)
    k_mitigate = _key("mitigate", model_id, config.dtype, config.recommended, config.calib, config.eval)
    outputs = [out / "mitigate.json", out / landscape.BEFORE_FILE, out / landscape.AFTER_FILE]
    if log.fresh("mitigate", k_mitigate, outputs):
        header("mitigate", "(cached)")
    else:
        header("mitigate", config.recommended)
        t0 = time.perf_counter()
        layers = landscape.default_layers(prof)
        window = ev.input_ids[:1]
        landscape.capture_to_file(lm.model, window, out / landscape.BEFORE_FILE, layers, tokenizer=lm.tokenizer)
        mconf = MeasureConfig(batch_size=config.batch_size)  # the batches of compare's evaluations
        before = measure(lm.model, ev, mconf, tokenizer=lm.tokenizer)
        done: dict = {}

        def after_mitigation(name: str, result) -> dict:
            done["result"], done["after"] = result, measure(lm.model, ev, mconf, tokenizer=lm.tokenizer)
            landscape.capture_to_file(lm.model, window, out / landscape.AFTER_FILE, layers, tokenizer=lm.tokenizer)
            return {"fp": done["after"]["ppl"]}

        rec = dataclasses.replace(cconf, methods=(config.recommended,),
                                  quants=config.quants if config.recommended in config.methods else ("fp",))
        compare(lm, rec, out, progress=progress, profile=prof, known={("none", "fp"): before["ppl"]},
                on_method=after_mitigation, force=True, log=lambda s: console.print(f"  {s}"))
        if "after" not in done:
            raise OutlierlabError(f"the recommended mitigation {config.recommended!r} could not be applied "
                                  f"(see {out / 'compare.json'})")
        result, after = done["result"], done["after"]
        doc = {"methods": result.applied, "before": before, "after": after, "reduction": reduction(before, after),
               "protocol": config.eval.protocol(), "seconds": time.perf_counter() - t0}
        atomic_write_json(out / "mitigate.json", doc)
        console.print(f"  residual max {before['resid_max']:,.0f} -> {after['resid_max']:,.0f}; CO max ratio "
                      f"{before['co_ratio_max']:.1f} -> {after['co_ratio_max']:.1f}; perplexity "
                      f"{before['ppl']:.2f} -> {after['ppl']:.2f}")
        log.done("mitigate", k_mitigate, time.perf_counter() - t0)

    # -- compare (caches every cell itself) ---------------------------------------------------------
    header("compare", f"{len(config.methods)} methods x {len(config.quants)} quantizations")
    t0 = time.perf_counter()
    table = compare(lm, cconf, out, progress=progress, profile=prof)
    render_table(table, console)
    log.done("compare", _key("compare", model_id, cconf), time.perf_counter() - t0)

    # -- report -------------------------------------------------------------------------------------
    header("report", "")
    t0 = time.perf_counter()
    timings = {**log.seconds(), "total (this run)": time.perf_counter() - t_all}
    path = build_report(out, timings=timings)
    log.done("report", _key("report", time.time()), time.perf_counter() - t0)
    total = time.perf_counter() - t_all
    console.rule("[bold]summary[/]")
    for line in summary_lines(out):
        console.print(f"  {line}", markup=False, highlight=False)
    console.print(f"wrote {path} in {total:.0f} s ({total / 60:.1f} min)")
    return {"report": str(path), "seconds": total, "stages": log.seconds(), "failed_cells": table.failures}
