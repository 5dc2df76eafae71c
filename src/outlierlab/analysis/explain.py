"""Explain: the formation mechanism of every massive activation (MA) and channel-wise outlier (CO), with
evidence, on any model an adapter describes.

``explain(model, windows, ExplainConfig()) -> Explanation`` profiles the windows (or reuses a profile), then

- for each MA (grouped by token index and channel): the origin steps that build it, layer by layer, with their
  mechanism (W_down fed by y6, W_o fed by the attention context, a norm gain behind a branch, a bias;
  :mod:`.attribution`), each step and all steps together verified by ablation (MA left and perplexity), the
  down-projection input channels with their gate / act / up values, super-weight candidates, and its
  propagation along the residual stream with the layers that cancel it (:mod:`.explain_ma`);
- for each CO: the gain gamma, the channel before vs after the gain and the share gamma explains, the
  outlier-triggering weight columns (OTCs), q/k output channels per head, persistence and channel-wise vs
  token-wise (:mod:`.explain_co`).

``Explanation.to_json()`` is the ``explain`` section of report.json (schema in docs/explain.md);
``Explanation.narrative()`` gives short sentences with the numbers (:mod:`.narrative`). The model's weights,
gains and biases are only changed during an ablation, and restored bit-exactly on every exit.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..adapters import get_adapter
from ..errors import DataError, OutlierlabError
from ..evaluation import EvalConfig
from ..runtime.offload import writable
from .attribution import attention_reads
from .detect import DetectConfig
from .explain_co import channel_outliers, find_otcs, qk_outliers
from .explain_ma import (
    TRACK_POSITIONS,
    _Rows,
    ablate,
    ablation_targets,
    explain_group,
    group_massive,
)
from .layout import capture_token_rows, same_as_map
from .narrative import narrative
from .records import jsonable

EXPLAIN_VERSION = "1.1"


@dataclass(frozen=True)
class ExplainConfig:
    """Knobs of the explainer (defaults: ``outlierlab explain`` on SmolLM2-135M in well under 5 min on 2 CPUs)."""

    #: outlier rules; when a profile is passed in, the profile's own rules are used instead
    detect: DetectConfig = field(default_factory=DetectConfig)
    #: windows per forward pass (profile, sample pass)
    batch_size: int = 4
    # -- massive activations
    max_mas: int = 8                # MA groups explained, largest first (0 = all)
    step_share: float = 0.1         # origin step: a branch writing at least this share of the residual peak
    norm_gain_share: float = 0.5    # a step behind a norm is norm_gain when the gain makes this share of it (log)
    attention_keys: int = 3         # key positions listed per context channel of an o_proj step
    origin_fraction: float = 0.5    # span: layers holding this fraction of the peak (MAs off the residual: origin)
    top_contributors: int = 5       # terms of the writer decomposition reported
    top_channels: int = 3           # down-projection input channels reported per MA
    min_share: float = 0.1          # a candidate's term must carry at least this share of the writer output
    max_candidates: int = 2         # super-weight candidates ablated per origin step
    max_ablations: int = 4          # ablation runs in total (each: eval perplexity + MA windows)
    #: evaluation windows (the first N of the protocol) behind each ablation's perplexity: the ablations ask "is
    #: the MA gone, does the perplexity jump", which a few windows answer; None: every protocol window
    ablation_windows: int | None = 2
    ablate: bool = True
    cancel_step: float = 0.2        # a cancelling layer removes at least this fraction of the peak
    cancel_fraction: float = 0.1    # "cancelled" once below this fraction of the peak
    eval: EvalConfig = field(default_factory=EvalConfig)
    # -- channel-wise outliers
    co_windows: int = 2             # calibration windows of the sample pass (gain before/after, token fractions)
    otc_k: float = 10.0             # OTC: score >= otc_k x the median score of its projection
    otc_roles: tuple[str, ...] = ("q", "k", "v", "gate", "up", "fc1")
    drivers: int = 3                # input channels listed per projection output outlier
    channelwise_fraction: float = 0.5


@dataclass
class Explanation:
    massive_activations: list[dict]
    other_massive: list[dict]
    channel_outliers: list[dict]
    otcs: list[dict]
    qk_outliers: list[dict]
    perplexity: dict
    config: ExplainConfig
    timings: dict
    notes: list[str] = field(default_factory=list)
    model_info: dict = field(default_factory=dict)
    #: the profile explained (made here or given); ``profile.extra["explain"] = to_json()`` + ``save`` writes
    #: the full report
    profile: object = field(default=None, repr=False)

    def to_json(self) -> dict:
        """The ``explain`` section of report.json."""
        cos = self.channel_outliers
        at_norm = [c for c in cos if c["gamma"] is not None]
        return jsonable({
            "version": EXPLAIN_VERSION,
            "config": self.config,
            "definitions": DEFINITIONS,
            "perplexity": self.perplexity,
            "summary": {
                "n_massive": len(self.massive_activations),
                "n_super_weights_verified": sum(1 for g in self.massive_activations
                                                for s in g.get("super_weights", []) if s.get("verified")),
                "n_joint_ablations_verified": sum(1 for g in self.massive_activations
                                                  if (g.get("joint_ablation") or {}).get("verified")),
                "n_explained": sum(1 for g in self.massive_activations if g["steps_joint"].verified),
                "n_origin_steps": sum(len(g["steps"]) for g in self.massive_activations),
                "n_channel_outliers": len(cos),
                "n_channel_outliers_at_norms": len(at_norm),
                "n_gamma_dominated": sum(1 for c in at_norm if (c["gamma_share"] or 0) >= 0.5),
                "n_otcs": len(self.otcs),
                "n_otcs_weight": sum(1 for o in self.otcs if o["cause"] == "weight"),
                "n_qk_outliers": len(self.qk_outliers),
            },
            "massive_activations": self.massive_activations,
            "other_massive": self.other_massive,
            "channel_outliers": cos,
            "otcs": self.otcs,
            "qk_outliers": self.qk_outliers,
            "timings": self.timings,
            "notes": self.notes,
        })

    def narrative(self, max_cos: int = 3) -> list[str]:
        return narrative(self, max_cos)


DEFINITIONS = {
    "ma_rule": "|x| > max(ma_abs, ma_rel x median |x| of the tensor) (analysis.detect)",
    "ma_group": "MA records at attn.in/mlp.in/block.out/attn.out/mlp.out (+post-norms) sharing token and channel",
    "origin_step": "a branch (attn, mlp) of a layer up to the residual peak that adds >= step_share of |peak| "
                   "towards its sign; MA off the residual stream: the larger projection output at the first layer "
                   "reaching origin_fraction of the tracked peak",
    "mechanism": "norm_gain if a branch output norm's log gain ratio is >= norm_gain_share of (log gain ratio + "
                 "log |pre-gain value| / its median); else bias if b[d] exceeds every term W[d, j] x[j]; else "
                 "down_proj (FFN) / o_proj (attention)",
    "origin": "the first origin step's layer; position: first MA-rule hit of that token in the step's branch, in "
              "execution order",
    "share": "term W[channel, j] * x_in[j] divided by the writer output at (token, channel)",
    "span": "layers from the origin on where the unablated MA is >= origin_fraction of its peak",
    "verified": "after the ablation (weights / biases zeroed, gains set to the median gain), |x[token, channel]| "
                "<= the MA rule threshold (unablated medians) at every tracked position of every layer of the span",
    "explained": "steps_joint (all origin steps ablated together) is verified",
    "cancel_layers": "layers after the peak whose residual value loses >= cancel_step of the peak",
    "gamma_share": "(log ratio_after - log ratio_before) / log ratio_after, clipped to [0, 1]; ratios = channel "
                   "median |.| / tensor median |.| of the norm output and of (output - bias) / gamma",
    "otc": "input column c with E|x_c| * ||W[:, c]|| >= otc_k x the projection's median score; cause 'weight' if "
           "log(col norm / median) >= half of log(score / median)",
    "qk_outlier": "q/k output channel whose profile channel median >= co_k x its head's median channel",
    "token_fraction": "fraction of sample tokens with |x_c| > co_k x the tensor median",
}


# -- inputs ---------------------------------------------------------------------------------------------
def _resolve_model(lm_or_model, tokenizer):
    from ..models.loader import LoadedModel, load_model

    if isinstance(lm_or_model, (str, Path)):
        lm_or_model = load_model(str(lm_or_model))
    if isinstance(lm_or_model, LoadedModel):
        return lm_or_model, lm_or_model.model, tokenizer or lm_or_model.tokenizer, lm_or_model.info
    if isinstance(lm_or_model, torch.nn.Module):
        return None, lm_or_model, tokenizer, {"model_type": getattr(lm_or_model.config, "model_type", None)}
    raise TypeError("pass a LoadedModel (outlierlab.load_model), a model string, or a HF causal LM module")


def _resolve_windows(windows, lm):
    from ..data import DataConfig, Windows

    if isinstance(windows, (torch.Tensor, Windows)):
        return windows
    if windows is None or isinstance(windows, (str, DataConfig)):
        if lm is None:
            raise OutlierlabError("pass token windows (a [n, seq_len] LongTensor or Windows) for a bare model")
        from ..api import as_windows

        return as_windows(windows, lm)
    raise TypeError("windows must be Windows, a [n, seq_len] LongTensor, a DataConfig, a source string or None")


def _eval_ids(eval_windows, lm, tokenizer, cfg: ExplainConfig, notes: list[str]):
    if eval_windows is not None:
        return getattr(eval_windows, "input_ids", eval_windows), {"source": "given",
                                                                 "n_windows": len(getattr(eval_windows,
                                                                                          "input_ids",
                                                                                          eval_windows))}
    if tokenizer is None:
        notes.append("no evaluation windows and no tokenizer: perplexity not measured")
        return None, None
    from ..evaluation import eval_windows as make_eval
    from ..models.loader import max_positions

    try:
        w = make_eval(tokenizer, cfg.eval, max_positions=max_positions(lm.model) if lm is not None else None)
    except DataError as exc:
        notes.append(f"evaluation windows unavailable ({exc}): perplexity not measured")
        return None, None
    return w.input_ids, cfg.eval.protocol()


def _ablation_subset(ids: torch.Tensor, protocol: dict, cfg: ExplainConfig) -> tuple[torch.Tensor, dict]:
    """The first ``cfg.ablation_windows`` evaluation windows, and the protocol saying so."""
    n = ids.shape[0] if cfg.ablation_windows is None else min(cfg.ablation_windows, ids.shape[0])
    return ids[:n], {**protocol, "n_windows_used": int(n), "n_windows_protocol": int(ids.shape[0])}


def _ppl_fn(model, ids, batch_size):
    from ..evaluation import perplexity

    return lambda: perplexity(model, ids, batch_size=batch_size)


# -- the entry point ------------------------------------------------------------------------------------
def explain(lm_or_model, windows=None, config: ExplainConfig | None = None, profile=None, eval_windows=None,
            tokenizer=None, progress: bool = False) -> Explanation:
    """Explain the MAs and COs of a model on ``windows`` (profiled here unless ``profile`` is given, which
    must come from the same model and windows). ``eval_windows`` (default: the brown:eval protocol when a
    tokenizer is known) measure the perplexity before/after each ablation."""
    cfg = config or ExplainConfig()
    lm, model, tokenizer, info = _resolve_model(lm_or_model, tokenizer)
    windows = _resolve_windows(windows, lm)
    ids = getattr(windows, "input_ids", windows)
    adapter = get_adapter(model)
    notes: list[str] = []
    timings: dict[str, float] = {}
    t0 = time.perf_counter()

    if profile is None:
        from ..tracing import ProfileConfig
        from ..tracing import profile as run_profile

        profile = run_profile(model, windows, ProfileConfig(detect=cfg.detect, batch_size=cfg.batch_size),
                              tokenizer=tokenizer, progress=progress, model_info=info)
        timings["profile_s"] = time.perf_counter() - t0
    else:
        det = getattr(getattr(profile, "config", None), "detect", None)
        if isinstance(det, DetectConfig) and det != cfg.detect:
            cfg = dataclasses.replace(cfg, detect=det)
            notes.append("thresholds taken from the given profile's detect config")

    # weights that accelerate offloaded are read (and ablated, then restored) as host tensors from here on
    with writable(model, write_back=False):
        return _explain(lm, model, adapter, ids, profile, cfg, tokenizer, eval_windows, info, notes, timings, t0,
                        progress)


def _explain(lm, model, adapter, ids, profile, cfg, tokenizer, eval_windows, info, notes, timings, t0, progress
             ) -> Explanation:
    # -- massive activations
    t1 = time.perf_counter()
    mas = _massive(model, adapter, ids, profile, cfg, notes)
    timings["ma_s"] = time.perf_counter() - t1

    eval_ids, protocol = _eval_ids(eval_windows, lm, tokenizer, cfg, notes) if cfg.ablate and mas else (None, None)
    if eval_ids is not None:
        eval_ids, protocol = _ablation_subset(eval_ids, protocol, cfg)
    ppl = {"baseline": None, "protocol": protocol}
    if cfg.ablate and mas:
        t2 = time.perf_counter()
        n = len({key for g in mas for key, _ in ablation_targets(g, adapter)})
        with _bar(min(n, cfg.max_ablations), progress, "ablating origin steps and super weights") as advance:
            res = ablate(model, adapter, mas, ids, profile, cfg, eval_ids,
                         _ppl_fn(model, eval_ids, cfg.eval.batch_size) if eval_ids is not None else None,
                         advance)
        ppl["baseline"] = res["ppl_baseline"]
        timings["ablation_s"] = time.perf_counter() - t2

    # -- channel-wise outliers
    t3 = time.perf_counter()
    otcs = find_otcs(adapter, profile, cfg)
    cos = channel_outliers(model, adapter, profile, ids, otcs, cfg)
    qk = qk_outliers(adapter, profile, otcs, cfg)
    timings["co_s"] = time.perf_counter() - t3
    timings["explain_s"] = time.perf_counter() - t0

    other = _other_massive(profile, mas)
    return Explanation(mas, other, cos, otcs, qk, ppl, cfg, timings, notes, info or {}, profile)


def _massive(model, adapter, ids: torch.Tensor, profile, cfg: ExplainConfig, notes: list[str]) -> list[dict]:
    """The ``max_mas`` largest MA groups with their origin steps, from one capture per window (no ablation)."""
    groups = group_massive(profile, adapter)
    if cfg.max_mas and len(groups) > cfg.max_mas:
        notes.append(f"{len(groups)} MA groups; the {cfg.max_mas} largest are explained (max_mas)")
        groups = groups[:cfg.max_mas]
    smap = same_as_map(adapter)
    by_window: dict[int, list[int]] = {}
    for g in groups:
        toks = by_window.setdefault(g["window"], [])
        if g["token_index"] not in toks:
            toks.append(g["token_index"])
    captures = {w: _Rows(capture_token_rows(model, adapter, ids[w], toks), toks, smap)
                for w, toks in by_window.items()}
    return [explain_group(g, captures[g["window"]], profile, adapter, cfg,
                          _reader(model, adapter, ids[g["window"]], captures[g["window"]], cfg)) for g in groups]


def _reader(model, adapter, window: torch.Tensor, rows: _Rows, cfg: ExplainConfig):
    """``reader(layer, token, channels)``: the attention reads of an o_proj step (one forward of the window)."""
    def read(layer: int, token: int, channels: list[int]):
        ctx = rows.row(layer, "attn.ctx", token)
        if ctx is None:
            return None
        return attention_reads(model, adapter, window, layer, token, ctx, channels, cfg.attention_keys)

    return read


def _other_massive(profile, mas: list[dict]) -> list[dict]:
    """MA records outside the tracked positions (y6, q, k...), tied to the MA whose origin layer holds them."""
    origin = {}
    for i, g in enumerate(mas):
        if g.get("origin"):
            origin.setdefault((g["origin"]["layer"], g["token_index"]), i)
    out = []
    for m in profile.massive_activations:
        if m["position"] in TRACK_POSITIONS:
            continue
        out.append({"layer": m["layer"], "position": m["position"], "alias": m.get("alias"),
                    "token_index": m["token_index"], "channel": m["channel"], "value": float(m["value"]),
                    "in_origin_of": origin.get((m["layer"], m["token_index"]))})
    return out


class _bar:
    def __init__(self, total: int, enabled: bool, description: str):
        from ..progress import progress_bar

        self.progress = progress_bar(enabled)
        self.total, self.description = total, description

    def __enter__(self):
        self.progress.__enter__()
        task = self.progress.add_task(self.description, total=self.total)
        return lambda: self.progress.advance(task)

    def __exit__(self, *exc):
        return self.progress.__exit__(*exc)


# -- reusing a saved profile ----------------------------------------------------------------------------
def profile_from_report(out_dir: str | Path):
    """Rebuild a :class:`~outlierlab.tracing.Profile` from ``report.json`` + ``profile.safetensors`` (as
    written by ``outlierlab profile``). Top-k entries come back without their window index (-1)."""
    from ..tracing import ProfileConfig, StatsConfig
    from ..tracing.result import ARRAY_KEYS, PositionResult, Profile, load_report

    out_dir = Path(out_dir)
    if not (out_dir / "report.json").is_file():
        raise OutlierlabError(f"no report.json in {out_dir}: run `outlierlab profile --out {out_dir}` first")
    try:
        report, arrays = load_report(out_dir)
    except (OSError, ValueError, json.JSONDecodeError) as exc:
        raise OutlierlabError(f"cannot read the profile in {out_dir}: {exc}") from exc
    if report.get("kind") != "profile" or "layers" not in report:
        raise OutlierlabError(f"{out_dir}/report.json is not a profile report")
    layer_ids = sorted({int(k.split(".", 1)[0][1:]) for k in arrays if k.startswith("L")})
    if len(layer_ids) != len(report["layers"]):
        raise OutlierlabError(f"{out_dir}: report.json and profile.safetensors do not match")
    results = {}
    for layer, entries in zip(layer_ids, report["layers"]):
        for pos, js in entries.items():
            same = js.get("same_as")
            head = same.split(".", 1)[0] if same else ""
            # same_as is a position of this layer, or "L{n}.block.out" (a layer input traced once)
            prefix = same if head[:1] == "L" and head[1:].isdigit() else f"L{layer}.{same or pos}"
            stats = {"absmax": js["absmax"], "median": js["median"]}
            for key in ARRAY_KEYS:
                t = arrays.get(f"{prefix}.{key}")
                if t is None:
                    raise OutlierlabError(f"{out_dir}: array {prefix}.{key} missing")
                stats[key] = t
            top = js.get("top", [])
            stats["top_value"] = torch.tensor([e[0] for e in top], dtype=torch.float32)
            stats["top_token"] = torch.tensor([e[1] for e in top], dtype=torch.long)
            stats["top_channel"] = torch.tensor([e[2] for e in top], dtype=torch.long)
            stats["top_window"] = torch.full((len(top),), -1, dtype=torch.long)
            results[(layer, pos)] = PositionResult(layer, pos, js.get("alias"), stats, [], [], js.get("same_as"))
    cfgd = report.get("config") or {}
    try:
        config = ProfileConfig(stats=StatsConfig(**cfgd.get("stats", {})),
                               detect=DetectConfig(**cfgd.get("detect", {})),
                               batch_size=cfgd.get("batch_size", 1),
                               layers=tuple(cfgd["layers"]) if cfgd.get("layers") else None,
                               positions=tuple(cfgd["positions"]) if cfgd.get("positions") else None,
                               weights=cfgd.get("weights", True))
    except TypeError:
        config = ProfileConfig()
    weights = {k[len("weights."):]: v for k, v in arrays.items() if k.startswith("weights.")} or None
    prof = Profile(model_info=report.get("model", {}), data_info=report.get("data", {}), config=config,
                   adapter=report.get("adapter", {}), results=results,
                   massive_activations=report.get("massive_activations", []),
                   channel_outliers=report.get("channel_outliers", []), weights=weights,
                   timings=report.get("timings", {}), median_error=report.get("median_error", {}))
    return prof


__all__ = ["ExplainConfig", "Explanation", "explain", "narrative", "profile_from_report"]
