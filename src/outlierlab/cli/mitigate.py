"""``outlierlab mitigate``: apply mitigation methods, measure before/after, optionally export a checkpoint."""

from __future__ import annotations

import dataclasses
import json
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
    OutOpt,
    ProgressOpt,
    SeedOpt,
    SeqOpt,
    app,
    err,
    guarded,
    out,
    split_list,
)


def _coerce(proto, text: str, where: str):
    """Parse ``text`` into the type of the default value ``proto``."""
    from ..mitigation.base import MitigationError

    low = text.strip().lower()
    if low in ("none", "null"):
        return None
    if isinstance(proto, bool):
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise MitigationError(f"--set {where}: expected true/false, got {text!r}")
    try:
        if isinstance(proto, int):
            return int(text)
        if isinstance(proto, float):
            return float(text)
    except ValueError:
        raise MitigationError(f"--set {where}: expected a number, got {text!r}") from None
    if isinstance(proto, tuple) or "," in text or (proto is None and text.strip().isdigit()):
        items = split_list(text)
        parsed = []
        for s in items:
            try:
                parsed.append(json.loads(s))
            except json.JSONDecodeError:
                parsed.append(s)
        if proto is None or isinstance(proto, (tuple, str)):
            return tuple(parsed)
    if proto is None:
        try:
            return json.loads(text)
        except json.JSONDecodeError:
            return text
    return text


def _override(cfg, path: list[str], text: str, where: str):
    from ..mitigation.base import MitigationError

    names = {f.name for f in dataclasses.fields(cfg)}
    if path[0] not in names:
        raise MitigationError(f"--set {where}: {type(cfg).__name__} has no field {path[0]!r} "
                              f"(fields: {', '.join(sorted(names))})")
    current = getattr(cfg, path[0])
    if len(path) > 1:
        if not dataclasses.is_dataclass(current):
            raise MitigationError(f"--set {where}: {path[0]!r} is not a nested config")
        value = _override(current, path[1:], text, where)
    else:
        value = _coerce(current, text, where)
    return dataclasses.replace(cfg, **{path[0]: value})


def build_configs(methods: str, sets: list[str]) -> list:
    """``--method a,b`` plus ``--set a.field=value`` -> config instances (in the given order)."""
    from ..mitigation import METHODS
    from ..mitigation.base import MitigationError

    names = split_list(methods)
    if not names:
        raise MitigationError("--method: give at least one method (" + ", ".join(METHODS) + ")")
    unknown = [n for n in names if n not in METHODS]
    if unknown:
        raise MitigationError(f"unknown method(s) {', '.join(unknown)}; choose among {', '.join(METHODS)}")
    configs = {n: METHODS[n]() for n in names}
    for item in sets:
        if "=" not in item or "." not in item.split("=", 1)[0]:
            raise MitigationError(f"--set {item!r}: expected METHOD.FIELD=VALUE, e.g. tma.target=20")
        key, value = item.split("=", 1)
        method, *path = key.strip().split(".")
        if method not in configs:
            raise MitigationError(f"--set {item!r}: {method!r} is not among --method {methods}")
        configs[method] = _override(configs[method], path, value, item)
    return list(configs.values())


def print_before_after(before: dict, after: dict, console) -> None:
    from rich.table import Table

    from ..fmt import num
    from ..mitigation.measure import reduction

    red = reduction(before, after)
    t = Table(title="before / after (evaluation windows)")
    for col in ("", "before", "after", "change"):
        t.add_column(col, justify="right")
    rows = [("residual max |h|", "resid_max", "resid_max_x"), ("MA count (all positions)", "ma_count", None),
            ("MA count (residual)", "ma_count_resid", None), ("down-proj input max", "down_in_max", "down_in_max_x"),
            ("CO max/median (norm outputs)", "co_ratio_max", "co_ratio_max_x"),
            ("CO max/median (linear inputs)", "co_ratio_linear_inputs", "co_ratio_linear_inputs_x"),
            ("perplexity", "ppl", None)]
    for label, key, rkey in rows:
        change = ""
        if rkey and red.get(rkey):
            change = f"{red[rkey]:.2f}x less" if red[rkey] >= 1 else f"{1 / red[rkey]:.2f}x more"
        if key == "ppl" and "ppl_rel" in red:
            change = f"{100 * red['ppl_rel']:+.2f}%"
        t.add_row(label, num(before.get(key)), num(after.get(key)), change)
    console.print(t)
    cb, ca = before.get("co_ratio") or {}, after.get("co_ratio") or {}
    if cb:
        t = Table(title="CO max/median per position (max over layers)")
        for col in ("position", "before", "after"):
            t.add_column(col, justify="right")
        for pos in cb:
            t.add_row(pos, num(cb[pos]), num(ca.get(pos)))
        console.print(t)


@app.command("mitigate")
@guarded
def mitigate_cmd(
    method: str = typer.Option(..., "--method", "-M", help="tma | gamma | otc | smoothquant | rotate | prefix | "
                                                          "paper | none, comma-separated to combine"),
    model: str = ModelOpt,
    data: str = DataOpt,
    out_dir: Path = OutOpt,
    n_samples: int = typer.Option(8, "--n-samples", "-n", help="calibration windows"),
    seq_len: int = SeqOpt,
    seed: int = SeedOpt,
    bos: str = BosOpt,
    device: str = DeviceOpt,
    dtype: str = DtypeOpt,
    max_memory: str = MaxMemoryOpt,
    batch_size: int = BatchOpt,
    sets: list[str] = typer.Option([], "--set", "-s", help="config field, METHOD.FIELD=VALUE (repeatable), "
                                                          "e.g. tma.target=20, gamma.k=1.5, paper.otc.steps=30"),
    export: bool = typer.Option(False, "--export", help="write the mitigated model to DIR/model (HF checkpoint "
                                                        "+ outlierlab.json) and check it reloads"),
    sweep: bool = typer.Option(False, "--sweep", help="tma only: sweep every variant and target instead "
                                                      "(DIR/tma_sweep.json, .csv, .png)"),
    eval_data: str = typer.Option("brown:eval", "--eval-data", help="evaluation text (the protocol: brown:eval)"),
    eval_samples: int = typer.Option(8, "--eval-samples", help="evaluation windows (the protocol: 8)"),
    eval_seq_len: int = typer.Option(512, "--eval-seq-len", help="evaluation window length (the protocol: 512)"),
    progress: bool = ProgressOpt,
    debug: bool = DebugOpt,
) -> None:
    """Apply mitigation methods; report residual max, MA count, down-input max, CO ratios and perplexity
    before and after -> DIR/mitigate.json."""
    from ..api import as_windows
    from ..data import DataConfig
    from ..evaluation import EvalConfig, eval_windows
    from ..mitigation import mitigate, resolve
    from ..mitigation.base import MitigationError, config_to_json
    from ..mitigation.measure import MeasureConfig, measure, reduction
    from ..models.loader import load_model, max_positions
    from ..paths import atomic_write_json
    from ..tracing.result import library_versions

    t_start = time.perf_counter()
    configs = build_configs(method, sets)
    if sweep and [type(c).__name__ for c in configs] != ["TMAConfig"]:
        raise MitigationError("--sweep works with --method tma alone")
    with err.status("loading model and data"):
        lm = load_model(model, device, dtype, max_memory=max_memory)
        calib = as_windows(DataConfig(source=data, seq_len=seq_len, n_samples=n_samples, seed=seed, bos=bos), lm)
        ecfg = EvalConfig(source=eval_data, n_samples=eval_samples, seq_len=eval_seq_len)
        ev = eval_windows(lm.tokenizer, ecfg, max_positions=max_positions(lm.model))
    log = (lambda s: err.print(f"  {s}", highlight=False))
    mcfg = MeasureConfig(batch_size=batch_size)

    if sweep:
        from ..mitigation import sweep as sweep_mod

        with err.status("measuring the unmitigated model"):
            before = measure(lm.model, ev, dataclasses.replace(mcfg, fast=True))
        result = sweep_mod.sweep(lm.model, calib, ev, before=before, batch_size=batch_size, log=log,
                                 progress=progress)
        result.update({"model": lm.info, "calib": calib.describe(), "eval": ecfg.protocol()})
        paths = sweep_mod.save(result, out_dir)
        b = sweep_mod.best(result["rows"])
        if b is not None:
            out.print(f"largest residual-max cut within 1% perplexity: {b['variant']} target {b['target']}: "
                      f"{b['resid_x']:.1f}x ({100 * b['ppl_rel']:+.2f}%)")
        out.print(f"wrote {', '.join(str(p) for p in paths)} in {time.perf_counter() - t_start:.0f} s")
        return

    with err.status("measuring the unmitigated model (perplexity + operator statistics)"):
        before = measure(lm.model, ev, mcfg, tokenizer=lm.tokenizer)
    t0 = time.perf_counter()
    result = mitigate(lm.model, configs, calib, lm.tokenizer, log=log)
    seconds = time.perf_counter() - t0
    with err.status("measuring the mitigated model"):
        after = measure(lm.model, ev, mcfg, tokenizer=lm.tokenizer)
    doc = {
        "schema_version": "1.0",
        "kind": "mitigate",
        "methods": result.methods_json(),
        "before": before,
        "after": after,
        "seconds": seconds,
        "reduction": reduction(before, after),
        "exact": result.exact,
        "runtime": list(result.runtime),
        "order": [a["method"] for a in result.applied],
        "applied": [{k: a[k] for k in ("method", "exact", "seconds", "info") if k in a} for a in result.applied],
        "model": lm.info,
        "calib": calib.describe(),
        "eval": ecfg.protocol(),
        "requested": [config_to_json(c) for c in resolve(configs)],
        "versions": library_versions(),
    }
    if export:
        from ..mitigation import export as export_mod

        with err.status("exporting the checkpoint"):
            folder = export_mod.save(lm.model, lm.tokenizer, result, out_dir / "model")
            doc["export"] = {"path": str(folder), **export_check(lm.model, folder, ev.input_ids[:1, :64])}
        out.print(f"exported {folder} ({doc['export']['load_with']}); reload check: logits max rel. diff "
                  f"{doc['export']['reload_max_rel_diff']:.2e}")
    doc["total_seconds"] = time.perf_counter() - t_start
    path = atomic_write_json(out_dir / "mitigate.json", doc)
    print_before_after(before, after, out)
    out.print(f"methods {', '.join(doc['order'])} applied in {seconds:.1f} s"
              + (" (function-preserving)" if result.exact else "")
              + (f"; runtime parts: {', '.join(result.runtime)}" if result.runtime else ""))
    out.print(f"wrote {path} in {doc['total_seconds']:.0f} s")


def export_check(model, folder: Path, ids) -> dict:
    """Reload the export (runtime parts restored) and compare logits with the in-memory model."""
    import torch

    from ..mitigation import export as export_mod
    from ..runtime import call, input_device

    lm2 = export_mod.load(folder, str(input_device(model)), model.dtype)
    with torch.inference_mode():
        a = call(model, ids).logits.float()
        b = call(lm2.model, ids).logits.float().to(a.device)
    man = export_mod.read_manifest(folder)
    lm2.mitigation.remove()
    return {"reload_max_rel_diff": float((a - b).abs().max() / a.abs().max().clamp_min(1e-30)),
            "runtime_required": man["runtime_required"], "load_with": man["load_with"]}
