"""The mitigation x quantization table: every method of ``outlierlab.mitigation.METHODS`` crossed with every
quantization setting, each cell's perplexity under the one evaluation protocol, and its change against the
full-precision, unmitigated model.

A method's cells: ``mitigate(model, [method], calib, tokenizer)`` in place, with the original weights kept by a
:class:`~outlierlab.runtime.journal.WeightJournal` (on the host or on disk, never a second model on the device);
then for each quantization setting fake quantization (:func:`outlierlab.quantization.quantize_`, calibrated on the
same calibration windows, removed bit-identically after the cell) and the perplexity on the evaluation windows;
then the runtime parts are removed and the weights put back bit for bit, so the caller's model is unchanged. Methods that are not in ``METHODS`` (yet) are reported as
``not available``; a method or a setting that fails is reported as ``error`` with its message, and the others
still run.

Every finished cell is written at once to ``OUT/cells/<key>.json``, where ``key`` hashes the model (content
hash), the method and its config, the quantization config, the evaluation protocol, the calibration data and
a fingerprint of the code that computes the cell; a rerun (after an interruption, or with more methods)
computes only the missing cells. ``compare.json`` (protocol, configs, versions, every cell) and
``compare.csv`` (one row per cell) are written at the end, atomically.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import hashlib
import io
import json
import math
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..data import DataConfig, make_windows
from ..jsonsafe import jsonable
from ..paths import atomic_write_json, atomic_write_text
from ..progress import progress_bar
from ..quantization import QuantConfig, get_quant
from ..runtime.journal import WeightJournal
from .perplexity import EvalConfig, eval_windows, perplexity

SCHEMA = "outlierlab.compare/1"
DEFAULT_QUANTS = ("fp", "w8a8-tensor", "w8a8-token", "w4a8", "w4a4")
REFERENCE = ("none", "fp")


@dataclass(frozen=True)
class CompareConfig:
    """Which cells and how. ``calib``: the calibration windows given to every method and to static scales /
    GPTQ; ``sqnr``: also measure the per-linear quantization error of every cell on ``sqnr_samples``
    calibration windows (summary in the table's JSON/CSV, full table in ``cells/``)."""

    methods: tuple[str, ...] = ("none",)
    quants: tuple[str, ...] = DEFAULT_QUANTS
    eval: EvalConfig = field(default_factory=EvalConfig)
    calib: DataConfig = field(default_factory=DataConfig)
    batch_size: int = 4
    sqnr: bool = False
    sqnr_samples: int = 4
    #: where the original weights wait while a method's cells run and while a cell quantizes them, and where
    #: GPTQ's results wait until installed: "auto" (beside the weights on an accelerator that has room for
    #: them, else on the host), "cpu" (one host copy) or "disk"
    journal: str = "auto"


@dataclass
class Cell:
    method: str
    quant: str
    status: str = "pending"  # ok | not available | error
    ppl: float | None = None
    delta_ppl: float | None = None
    rel_delta_pct: float | None = None
    key: str = ""
    cached: bool = False
    error: str | None = None
    quant_config: dict = field(default_factory=dict)
    quant_summary: str = ""
    method_config: dict | None = None
    mitigation: dict = field(default_factory=dict)
    quant_info: dict = field(default_factory=dict)
    sqnr: dict | None = None
    timings: dict = field(default_factory=dict)
    #: where the number came from when not from this cell's own evaluation
    note: str | None = None

    def to_json(self) -> dict:
        return jsonable(self)

    def measured_elsewhere(self, ppl: float) -> None:
        """The cell's perplexity, measured by the caller with this protocol (no evaluation here)."""
        self.ppl, self.status, self.note = float(ppl), "ok", "measured by the caller"


@dataclass
class CompareResult:
    config: CompareConfig
    cells: list[Cell]
    reference: Cell
    document: dict
    out_dir: Path | None = None

    def get(self, method: str, quant: str) -> Cell:
        return next(c for c in self.cells if c.method == method and c.quant == quant)

    @property
    def failures(self) -> list[Cell]:
        """The cells that raised (``error``); ``not available`` methods are not failures."""
        return [c for c in self.cells if c.status == "error"]


# -- hashing -------------------------------------------------------------------------------------------------


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(jsonable(obj), sort_keys=True, default=repr).encode()).hexdigest()


def model_hash(model, info: dict | None = None) -> str:
    """The model's identity: the GGUF file's SHA-256 when it came from one, else a hash of every parameter and
    buffer (names, dtypes, shapes, bytes) and of the config."""
    if info and info.get("sha256"):
        return f"file:{info['sha256']}:{info.get('dtype')}"
    h = hashlib.blake2b(digest_size=20)
    h.update(json.dumps(model.config.to_diff_dict(), sort_keys=True, default=repr).encode())
    for name, t in list(model.state_dict().items()):
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return f"params:{h.hexdigest()}"


def code_fingerprint(method: str | None = None) -> dict:
    """Hashes of the code that determines a cell's numbers: the quantization package and the perplexity
    protocol, and (for methods other than ``none``) the mitigation package. Reports and tables are not
    included, so editing them keeps the cache."""
    from .. import __version__

    pkg = Path(__file__).parents[1]

    def digest(paths) -> str:
        h = hashlib.sha256()
        for p in sorted(paths):
            h.update(p.relative_to(pkg).as_posix().encode())
            h.update(p.read_bytes())
        return h.hexdigest()[:16]

    harness = digest([*pkg.glob("quantization/*.py"), pkg / "evaluation" / "perplexity.py"])
    methods = None if method in (None, "none") else digest(pkg.glob("mitigation/**/*.py"))
    return {"outlierlab": __version__, "harness": harness, "mitigation": methods}


# -- running -------------------------------------------------------------------------------------------------


def available_methods() -> dict[str, type]:
    """``outlierlab.mitigation.METHODS`` as it is now (new methods are picked up without changes here)."""
    from .. import mitigation

    return dict(mitigation.METHODS)


def _versions() -> dict:
    import transformers

    from .. import __version__

    return {"outlierlab": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version()}


def _parts(name: str) -> list[str]:
    """``"tma+quarot"`` -> ``["tma", "quarot"]``: a ``+``-joined name is those methods applied together."""
    return [p.strip() for p in name.split("+")]


def _unknown(name: str, methods: dict) -> list[str]:
    return [p for p in _parts(name) if p not in methods]


def _method_config(name: str, methods: dict) -> Any:
    """The config of a method; a tuple of configs for a combined name (``mitigate`` sorts them into the
    composition order)."""
    parts = _parts(name)
    if len(parts) == 1:
        return methods[name]()
    return tuple(methods[p]() for p in parts)


def _short_error(exc: BaseException) -> str:
    msg = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {msg}" if msg else type(exc).__name__


def compare(lm, config: CompareConfig | None = None, out_dir: str | Path | None = None, *,
            progress: bool = False, force: bool = False, on_cell=None, profile=None,
            known: dict[tuple[str, str], float] | None = None, on_method=None, log=None) -> CompareResult:
    """Run (or resume) the table for a :class:`~outlierlab.models.LoadedModel`. ``out_dir`` None: no files
    and no cache. ``force``: recompute cached cells. ``on_cell(cell)`` is called after each cell.

    Work done elsewhere on the same model and windows is not repeated: ``profile`` (a profile of the model on
    the calibration windows ``config.calib``) serves the first calibration of every method, and ``known``
    (``{(method, quant): perplexity}``, measured with this protocol, e.g. the pipeline's before/after
    measurement) fills those cells without a new evaluation. ``on_method(name, result)`` is called with the
    method applied, before its cells (the pipeline measures the mitigated model there); it may return
    ``{quant: perplexity}`` for cells it measured with this protocol. ``log`` receives the methods' lines."""
    from ..models.loader import max_positions

    config = config or CompareConfig()
    out = Path(out_dir) if out_dir is not None else None
    cells_dir = out / "cells" if out is not None else None
    quants: list[QuantConfig] = [get_quant(q) for q in config.quants]
    methods = available_methods()
    t_start = time.perf_counter()

    maxpos = max_positions(lm.model)
    ev = eval_windows(lm.tokenizer, config.eval, max_positions=maxpos)
    calib = make_windows(lm.tokenizer, config.calib, max_positions=maxpos)
    sqnr_ids = calib.input_ids[: config.sqnr_samples]
    protocol = config.eval.protocol()
    base = {"model": model_hash(lm.model, lm.info), "protocol": protocol,
            "calibration": dataclasses.asdict(config.calib), "batch_size": config.batch_size}

    wanted = [(m, q) for m in config.methods for q in quants]
    if not any(m == REFERENCE[0] and q.name == REFERENCE[1] for m, q in wanted):
        wanted = [(REFERENCE[0], get_quant(REFERENCE[1]))] + wanted
    cells: dict[tuple[str, str], Cell] = {}
    todo: dict[str, list[tuple[Cell, QuantConfig]]] = {}
    for m, q in wanted:
        cell = Cell(m, q.name, quant_config=q.to_dict(), quant_summary=q.describe())
        cells[(m, q.name)] = cell
        if _unknown(m, methods):
            cell.status = "not available"
            cell.error = (f"method {', '.join(map(repr, _unknown(m, methods)))} is not in "
                          f"outlierlab.mitigation.METHODS (available: {', '.join(methods)})")
            continue
        mcfg = _method_config(m, methods)
        cell.method_config = jsonable(mcfg)
        cell.key = _digest({**base, "method": m, "method_config": cell.method_config, "quant": q.to_dict(),
                            "code": code_fingerprint(m)})[:24]
        path = cells_dir / f"{cell.key}.json" if cells_dir is not None else None
        if path is not None and path.is_file() and not force:
            try:
                saved = json.loads(path.read_text())
                if saved.get("status") == "ok" and (not config.sqnr or q.is_fp or saved.get("sqnr")):
                    for k, v in saved.items():
                        if hasattr(cell, k):
                            setattr(cell, k, v)
                    cell.cached = True
                    continue
            except (OSError, ValueError):
                pass
        if (m, q.name) in (known or {}):
            cell.measured_elsewhere(known[(m, q.name)])
            if path is not None:
                atomic_write_json(path, cell.to_json())
            continue
        todo.setdefault(m, []).append((cell, q))

    n_todo = sum(len(v) for v in todo.values())
    run = _Shared(lm, calib, ev, sqnr_ids, config, cells_dir, on_cell, on_method, profile, log)
    with progress_bar(progress) as bar:
        task = bar.add_task("compare", total=n_todo)
        for m, items in todo.items():
            bar.update(task, description=f"{m}: mitigating")
            # the method edits the model in place; the journal gives the original weights back afterwards
            journal = WeightJournal(lm.model, config.journal) if m != "none" else contextlib.nullcontext()
            with journal:
                _run_method(run, m, _method_config(m, methods), items, lambda: bar.advance(task),
                            lambda d: bar.update(task, description=d))

    ref = cells[(REFERENCE[0], REFERENCE[1])]
    for cell in cells.values():
        if cell.status == "ok" and ref.status == "ok" and cell.ppl is not None:
            cell.delta_ppl = cell.ppl - ref.ppl
            cell.rel_delta_pct = 100.0 * (cell.ppl / ref.ppl - 1.0)
    ordered = [cells[(m, q.name)] for m, q in wanted]
    requested = [c for c in ordered if c.method in config.methods and c.quant in [q.name for q in quants]]
    doc = {
        "schema": SCHEMA,
        "model": {k: v for k, v in lm.info.items()},
        "model_hash": base["model"],
        "protocol": protocol,
        "calibration": {**dataclasses.asdict(config.calib), "n_windows": int(calib.input_ids.shape[0])},
        "config": {"methods": list(config.methods), "quants": [q.name for q in quants],
                   "batch_size": config.batch_size, "sqnr": config.sqnr, "sqnr_samples": config.sqnr_samples},
        "quant_presets": {q.name: {**q.to_dict(), "summary": q.describe()} for q in quants},
        "methods_available": sorted(methods),
        "versions": _versions(),
        "reference": {"method": ref.method, "quant": ref.quant, "ppl": ref.ppl},
        "cells": [_brief(c) for c in requested],
        "best": _best_json([c.to_json() for c in requested]),
        "timings": {"total_s": time.perf_counter() - t_start},
    }
    if out is not None:
        atomic_write_json(out / "compare.json", doc)
        write_csv(out / "compare.csv", requested)
    return CompareResult(config, requested, ref, doc, out)


@dataclass(frozen=True)
class _Shared:
    """What every method's cells share within one :func:`compare` call."""

    lm: Any
    calib: Any
    ev: Any
    sqnr_ids: torch.Tensor
    config: CompareConfig
    cells_dir: Path | None
    on_cell: Any = None
    on_method: Any = None
    profile: Any = None
    log: Any = None


def _run_method(run: _Shared, m: str, mcfg, items, advance, describe) -> None:
    """Mitigate the model with method ``m`` (in place), then run each of its cells; the runtime parts are
    removed on every exit path (the caller restores the weights)."""
    from ..mitigation import mitigate
    from ..runtime import registry

    model = run.lm.model
    t0 = time.perf_counter()
    try:
        result = mitigate(model, list(mcfg) if isinstance(mcfg, tuple) else [mcfg], run.calib, run.lm.tokenizer,
                          log=run.log, profile=run.profile)
    except Exception as exc:  # noqa: BLE001 - a broken method must not stop the table
        for cell, _ in items:
            cell.status, cell.error = "error", f"mitigation failed: {_short_error(exc)}"
            advance()
        return
    t_mit = time.perf_counter() - t0
    applied = {"applied": jsonable(result.applied), "runtime": list(result.runtime),
               "fp_prefix": registry(model).fp_prefix}
    try:
        measured = (run.on_method(m, result) if run.on_method is not None else None) or {}
        for cell, q in items:
            describe(f"{m} x {q.name}")
            cell.mitigation = applied
            cell.timings["mitigation_s"] = t_mit
            if q.name in measured:
                cell.measured_elsewhere(measured[q.name])
            else:
                _run_cell(model, cell, q, run.calib, run.ev, run.sqnr_ids, run.config)
            if cell.status == "ok" and run.cells_dir is not None:
                atomic_write_json(run.cells_dir / f"{cell.key}.json", cell.to_json())
            if run.on_cell is not None:
                run.on_cell(cell)
            advance()
    finally:
        result.remove()


def best_per_quant(cells) -> dict:
    """For every quantization setting, its finished cell of lowest perplexity (cells as dicts, compare.json's)."""
    best: dict = {}
    for c in cells:
        if c.get("status") == "ok" and c.get("ppl") is not None:
            q = c["quant"]
            if q not in best or c["ppl"] < best[q]["ppl"]:
                best[q] = c
    return best


def _best_json(cells: list[dict]) -> dict:
    """``{quant: {"method", "ppl", "rel_delta_pct"}}``: compare.json's ``best``."""
    return {q: {k: c.get(k) for k in ("method", "ppl", "rel_delta_pct")} for q, c in best_per_quant(cells).items()}


def _brief(cell: Cell) -> dict:
    """A cell for compare.json: the per-linear error table stays in cells/<key>.json."""
    d = cell.to_json()
    if d.get("sqnr"):
        d["sqnr"] = {k: v for k, v in d["sqnr"].items() if k != "linears"}
    return d


def _run_cell(work, cell: Cell, q: QuantConfig, calib, ev, sqnr_ids, config: CompareConfig) -> None:
    from ..quantization.fake import prepare
    from .sqnr import quant_error

    try:
        t0 = time.perf_counter()
        plan = prepare(work, q, calib, batch_size=config.batch_size, store=config.journal)
        cell.timings["quantize_s"] = time.perf_counter() - t0
        if config.sqnr and not q.is_fp:
            t1 = time.perf_counter()
            rep = quant_error(work, q, calib, sqnr_ids, batch_size=config.batch_size, plan=plan)
            cell.sqnr = {**rep.summary(), "worst": [
                {"operator": r.operator, "sqnr_db": r.sqnr_db if math.isfinite(r.sqnr_db) else None,
                 "rel_mse": r.rel_mse, "cause": r.cause} for r in rep.worst(5)],
                "linears": rep.csv_rows(), "kv": rep.to_json()["kv"]}
            cell.timings["sqnr_s"] = time.perf_counter() - t1
        t2 = time.perf_counter()
        with plan.install(work, restore=True, store=config.journal) as state:
            cell.quant_info = {k: v for k, v in state.info.items() if not k.endswith("_s")}
            ppl = perplexity(work, ev, config.batch_size)
        cell.timings["eval_s"] = time.perf_counter() - t2
        cell.ppl = ppl
        if not math.isfinite(ppl):
            cell.status, cell.error = "error", "perplexity is not finite (NaN/inf in the logits)"
        else:
            cell.status = "ok"
    except Exception as exc:  # noqa: BLE001 - one failing cell must not stop the others
        cell.status, cell.error = "error", _short_error(exc)


CSV_FIELDS = ("method", "quant", "status", "ppl", "delta_ppl", "rel_delta_pct", "quant_summary",
              "worst_operator", "worst_rel_mse", "worst_cause", "mitigation_s", "quantize_s", "eval_s", "cached",
              "key", "error")


def write_csv(path: str | Path, cells: list[Cell]) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CSV_FIELDS)
    w.writeheader()
    for c in cells:
        worst = (c.sqnr or {}).get("worst_rel_mse") or {}
        w.writerow({
            "method": c.method, "quant": c.quant, "status": c.status,
            "ppl": _fmt(c.ppl), "delta_ppl": _fmt(c.delta_ppl), "rel_delta_pct": _fmt(c.rel_delta_pct),
            "quant_summary": c.quant_summary, "worst_operator": worst.get("operator", ""),
            "worst_rel_mse": _fmt(worst.get("rel_mse")), "worst_cause": worst.get("cause", ""),
            "mitigation_s": _fmt(c.timings.get("mitigation_s")), "quantize_s": _fmt(c.timings.get("quantize_s")),
            "eval_s": _fmt(c.timings.get("eval_s")), "cached": c.cached, "key": c.key, "error": c.error or "",
        })
    atomic_write_text(path, buf.getvalue())


def _fmt(x) -> str:
    if x is None:
        return ""
    if isinstance(x, float):
        return f"{x:.6g}" if math.isfinite(x) else ""
    return str(x)


def render_table(result: CompareResult, console=None):
    """The table for the terminal (rich): perplexity and its change against none/fp for every cell. Methods
    are rows and settings columns, or the other way round when there are more settings than methods."""
    from rich.table import Table

    quants = list(dict.fromkeys(c.quant for c in result.cells))
    methods = list(dict.fromkeys(c.method for c in result.cells))
    ref = result.reference
    p = result.document["protocol"]
    title = f"perplexity on {p['source']} ({p['n_samples']} x {p['seq_len']} tokens)"
    if ref.ppl is not None:
        title += f"; change vs none/fp ({ref.ppl:.2f})"
    by_method = len(quants) <= len(methods)
    rows, cols = (methods, quants) if by_method else (quants, methods)
    table = Table(title=title)
    table.add_column("method \\ quant" if by_method else "quant \\ method", style="bold", no_wrap=True)
    for name in cols:
        table.add_column(name, justify="right", no_wrap=True)
    for r in rows:
        line = [r]
        for col in cols:
            m, q = (r, col) if by_method else (col, r)
            c = next((x for x in result.cells if x.method == m and x.quant == q), None)
            if c is None:
                line.append("")
            elif c.status == "ok":
                delta = "" if c.rel_delta_pct is None else f"\n[dim]{c.rel_delta_pct:+.1f}%[/]"
                line.append(f"{c.ppl:.2f}{delta}")
            elif c.status == "not available":
                line.append("[yellow]n/a[/]")
            else:
                line.append("[red]error[/]")
        table.add_row(*line)
    if console is not None:
        console.print(table)
        best = result.document.get("best") or {}
        if best:
            console.print("best: " + "; ".join(f"{q} {b['method']} ({b['ppl']:.2f})" for q, b in best.items()),
                          highlight=False)
        missing = sorted({c.method for c in result.cells if c.status == "not available"})
        if missing:
            console.print(f"[yellow]not available[/] (not in outlierlab.mitigation.METHODS): {', '.join(missing)}",
                          highlight=False)
        for c in result.cells:
            if c.status == "error":
                console.print(f"[red]{c.method} x {c.quant}[/]: {c.error}", highlight=False)
    return table
