"""Channel-wise outliers: how much of each one the norm gain explains, which weight columns trigger outliers
(OTCs), the q/k output channels that stand out per head, and how persistent each outlier is.

Definitions:

- **gamma**: the effective gain of the norm whose output is the CO's position (``weight + gain_offset``, so
  Gemma's ``1 + w`` is respected); ``gain_ratio`` = |gamma_c| / median |gamma|.
- **Before / after the gain**: on ``co_windows`` calibration windows, the norm output y and its normalized
  input xhat = (y - beta) / gamma (beta: the norm's bias, if any) give ``ratio_after`` = median_t |y_c| /
  median |y| and ``ratio_before`` = median_t |xhat_c| / median |xhat| (exact medians over a fixed subset of
  512 tokens per batch, averaged over batches). A per-head gain (q/k norms) repeats over the heads.
- **gamma_share** = (log ratio_after - log ratio_before) / log ratio_after, clipped to [0, 1]: the fraction of
  the channel's (log) outlier ratio the gain adds. 1: the channel is ordinary before the gain; 0: the gain
  adds nothing. ``gamma_share_raw`` is the unclipped value; null where ratio_after <= 1 on the sample.
- **OTC**: an input column c of a projection in ``otc_roles`` (q, k, v, gate, up, fc1; fused qkv / gate_up are
  cut into those parts) whose score E|x_c| * ||W[:, c]||_2 is at least ``otc_k`` x the median score of that
  projection (E|x_c| is the profile's mean |x| per channel at the projection's input). ``cause`` says which
  factor dominates: ``weight`` when log(||W[:, c]|| / median col norm) is at least half of log(score / median
  score), else ``activation`` (e.g. the column reads a channel a large gamma made big).
- **q/k outliers**: output channels of q and k whose typical magnitude (profile channel median) is at least
  ``co_k`` x the median channel of their head, with the input channels driving them
  (E|x_c| * |W[o, c]|, share of the row's total).
- **Persistence**: ``layers``: the layers where the same (position, channel) is a CO; ``residual_layers``: for
  hidden-dimension positions, the layers where the channel is a CO on the residual stream; ``persistence`` is
  ``residual-carried`` (a CO on the residual stream of this layer), ``multi-layer`` or ``single-layer``;
  ``token_fraction``: the fraction of tokens of the sample where |x_c| > co_k x the tensor median, and ``kind``
  ``channel-wise`` when that fraction is at least ``channelwise_fraction`` (0.5), else ``token-wise``.
"""

from __future__ import annotations

import math
from collections import defaultdict

import torch

from ..adapters.base import Adapter
from ..runtime import BatchInfo, registry
from ..tracing.hooks import observe
from .detect import column_norms, otc_columns, otc_scores
from .layout import (
    HIDDEN_POSITIONS,
    RESIDUAL_POSITIONS,
    linear_parts,
    same_as_map,
)


def _norms_by_position(adapter: Adapter) -> dict[str, object]:
    """position -> NormSpec, for every position that is a norm's output (directly or through same_as)."""
    by_out = {n.output_position: n for n in adapter.norms() if n.output_position}
    out = dict(by_out)
    for p in adapter.positions():
        if p.same_as and p.same_as in by_out:
            out[p.name] = by_out[p.same_as]
    return out


def _stat(profile, layer: int, position: str, key: str, smap: dict[str, str]):
    r = profile.results.get((layer, position)) or profile.results.get((layer, smap.get(position, position)))
    return None if r is None else r.stats[key]


# -- OTCs -------------------------------------------------------------------------------------------------
@torch.no_grad()
def find_otcs(adapter: Adapter, profile, cfg) -> list[dict]:
    smap = same_as_map(adapter)
    out = []
    for layer in profile.layers:
        for part in linear_parts(adapter, layer):
            if part.role not in cfg.otc_roles:
                continue
            x_mean = _stat(profile, layer, part.input_position, "chan_mean", smap)
            if x_mean is None:
                continue
            col = column_norms(part.weight(adapter, layer))
            if col.numel() != x_mean.numel():
                continue
            score = otc_scores(x_mean, col)
            cols, med = otc_columns(score, cfg.otc_k)
            if not cols:
                continue
            x_mean, ratio = x_mean.float(), score / med
            x_med = float(x_mean.median().clamp_min(1e-30))
            c_med = float(col.median().clamp_min(1e-30))
            for c in cols:
                r = float(ratio[c])
                wr = float(col[c]) / c_med
                ws = math.log(max(wr, 1e-30)) / math.log(r) if r > 1 else 0.0
                out.append({"layer": layer, "module": part.module, "role": part.role, "col": c,
                            "input_position": part.input_position, "score": float(score[c]), "ratio": r,
                            "act_ratio": float(x_mean[c]) / x_med, "weight_ratio": wr, "weight_share": ws,
                            "cause": "weight" if ws >= 0.5 else "activation"})
    out.sort(key=lambda o: -o["ratio"])
    return out


def _drivers(adapter: Adapter, part, layer: int, row: int, x_mean: torch.Tensor, otc_cols: set[int],
             top: int) -> list[dict]:
    w = part.weight(adapter, layer)[row].abs().cpu()
    contrib = x_mean.float() * w
    total = float(contrib.sum()) or 1.0
    k = min(top, contrib.numel())
    idx = contrib.topk(k).indices.tolist()
    return [{"col": c, "score": float(contrib[c]), "share": float(contrib[c]) / total, "otc": c in otc_cols}
            for c in idx]


def _head_dim(adapter: Adapter, n: int, role: str) -> tuple[int, int]:
    c = adapter.config
    hd = getattr(c, "head_dim", None) or (getattr(c, "hidden_size", None) or n) // getattr(
        c, "num_attention_heads", 1)
    hd = int(hd) if hd and n % int(hd) == 0 else n
    return n // hd, hd


def qk_outliers(adapter: Adapter, profile, otcs: list[dict], cfg) -> list[dict]:
    smap = same_as_map(adapter)
    otc_cols = defaultdict(set)
    for o in otcs:
        otc_cols[(o["layer"], o["module"], o["role"])].add(o["col"])
    out = []
    for layer in profile.layers:
        for part in linear_parts(adapter, layer):
            if part.role not in ("q", "k") or part.output_position is None:
                continue
            med = _stat(profile, layer, part.output_position, "chan_median", smap)
            x_mean = _stat(profile, layer, part.input_position, "chan_mean", smap)
            if med is None or x_mean is None:
                continue
            heads, hd = _head_dim(adapter, med.numel(), part.role)
            per_head = med.view(heads, hd)
            head_med = per_head.median(dim=1).values.clamp_min(cfg.detect.co_min)
            ratio = per_head / head_med[:, None]
            for h, i in torch.nonzero(ratio >= cfg.detect.co_k).tolist():
                o = h * hd + i
                out.append({"layer": layer, "role": part.role, "module": part.module,
                            "position": part.output_position, "head": h, "index": i, "channel": o,
                            "ratio_head": float(ratio[h, i]), "median": float(per_head[h, i]),
                            "drivers": _drivers(adapter, part, layer, o, x_mean,
                                                otc_cols[(layer, part.module, part.role)], cfg.drivers)})
    out.sort(key=lambda q: -q["ratio_head"])
    return out


# -- the sample pass: gains before/after, token fractions -------------------------------------------------
class _SamplePass:
    """Hook callback: for CO positions, counts of tokens above co_k x median per channel; for norm outputs
    holding COs, per-batch exact medians of |y| and of the normalized input |(y - beta) / gamma|."""

    def __init__(self, adapter: Adapter, profile, wanted: dict[tuple[int, str], float], norm_keys: set,
                 norms: dict[str, object]):
        self.adapter = adapter
        self.wanted = wanted  # (layer, traced position) -> count threshold
        self.norm_keys = norm_keys
        self.norms = norms
        self.batch = BatchInfo(1, 1)
        self.counts: dict[tuple[int, str], torch.Tensor] = {}
        self.rows: dict[tuple[int, str], int] = defaultdict(int)
        self.med: dict[tuple[int, str], dict[str, list]] = defaultdict(lambda: defaultdict(list))
        self._gain_cache: dict[tuple[int, str], tuple] = {}
        self.median_rows = 512

    def _gain(self, layer: int, name: str):
        key = (layer, name)
        if key not in self._gain_cache:
            spec = self.norms[name]
            gain = self.adapter.norm_gain(layer, spec)
            module = self.adapter.layers()[layer].get_submodule(spec.module)
            bias = getattr(module, "bias", None)
            self._gain_cache[key] = (gain, None if bias is None else bias.detach().float())
        return self._gain_cache[key]

    def __call__(self, layer: int, name: str, x: torch.Tensor) -> None:
        key = (layer, name)
        if key not in self.wanted:
            return
        xr = self.batch.as_3d(x.detach())
        rows = xr.reshape(-1, xr.shape[-1]).float()
        a = rows.abs()
        above = (a > self.wanted[key]).sum(0)
        self.counts[key] = above if key not in self.counts else self.counts[key] + above
        self.rows[key] += a.shape[0]
        if key not in self.norm_keys:
            return
        gain, bias = self._gain(layer, name)
        if gain is None or xr.shape[-1] % gain.numel():
            return
        # medians on a fixed subset of rows (exact on that subset): enough for ratios of 10x and more
        sub = rows.index_select(0, _row_sample(rows.shape[0], self.median_rows, rows.device))
        g = gain.to(rows.device).repeat(rows.shape[1] // gain.numel())
        beta = None if bias is None else bias.to(rows.device).repeat(rows.shape[1] // bias.numel())
        safe = g.abs() > 1e-6
        y = sub - beta if beta is not None else sub
        xhat = torch.where(safe, y / torch.where(safe, g, torch.ones_like(g)), torch.zeros_like(y)).abs()
        suba = sub.abs()
        m = self.med[key]
        m["after_chan"].append(suba.median(dim=0).values.cpu())
        m["after_all"].append(float(suba.flatten().median()))
        m["before_chan"].append(xhat.median(dim=0).values.cpu())
        m["before_all"].append(float(xhat.flatten().median()))


def _row_sample(n: int, k: int, device) -> torch.Tensor:
    if n <= k:
        return torch.arange(n, device=device)
    gen = torch.Generator().manual_seed(n)
    return torch.randperm(n, generator=gen)[:k].sort().values.to(device)


@torch.inference_mode()
def sample_pass(model, adapter: Adapter, profile, ids: torch.Tensor, cfg) -> _SamplePass:
    smap = same_as_map(adapter)
    norms = _norms_by_position(adapter)
    wanted, norm_keys = {}, set()
    for co in profile.channel_outliers:
        src = smap.get(co["position"], co["position"])
        med = _stat(profile, co["layer"], src, "median", smap)
        if med is None:
            continue
        wanted[(co["layer"], src)] = cfg.detect.co_k * float(med)
        if co["position"] in norms and src in norms:
            norm_keys.add((co["layer"], src))
    sp = _SamplePass(adapter, profile, wanted, norm_keys, norms)
    if not wanted:
        return sp
    n = min(cfg.co_windows, len(ids))
    layers = sorted({k[0] for k in wanted})
    positions = sorted({k[1] for k in wanted})
    sp.batch = registry(model).batch
    observe(model, adapter, sp, ids[:n], layers=layers, positions=positions, batch_size=cfg.batch_size)
    return sp


def _mean(xs):
    return sum(xs) / len(xs) if xs else None


def channel_outliers(model, adapter: Adapter, profile, ids: torch.Tensor, otcs: list[dict], cfg) -> list[dict]:
    smap = same_as_map(adapter)
    norms = _norms_by_position(adapter)
    sp = sample_pass(model, adapter, profile, ids, cfg)
    aliases = {p.name: p.alias for p in adapter.positions()}

    co_layers: dict[tuple[str, int], set[int]] = defaultdict(set)
    resid_layers: dict[int, set[int]] = defaultdict(set)
    for co in profile.channel_outliers:
        co_layers[(co["position"], co["channel"])].add(co["layer"])
        if co["position"] in RESIDUAL_POSITIONS:
            resid_layers[co["channel"]].add(co["layer"])

    otc_in = defaultdict(list)  # (layer, input position, col) -> OTCs reading that channel
    otc_cols = defaultdict(set)
    for o in otcs:
        otc_in[(o["layer"], smap.get(o["input_position"], o["input_position"]), o["col"])].append(o)
        otc_cols[(o["layer"], o["module"], o["role"])].add(o["col"])

    parts_cache: dict[int, list] = {}
    out = []
    for co in profile.channel_outliers:
        layer, position, c = co["layer"], co["position"], co["channel"]
        src = smap.get(position, position)
        if layer not in parts_cache:
            parts_cache[layer] = linear_parts(adapter, layer)
        entry = {"layer": layer, "position": position, "alias": aliases.get(position), "channel": c,
                 "ratio": co["ratio"], "median": co.get("median"), "absmax": co.get("absmax"),
                 "gamma": None, "gain_ratio": None, "gamma_share": None, "gamma_share_raw": None,
                 "ratio_before": None, "ratio_after": None, "otc": [], "drivers": None}
        spec = norms.get(position)
        if spec is not None:
            gain = adapter.norm_gain(layer, spec)
            if gain is not None:
                n = gain.numel()
                gi = c % n if n and _stat(profile, layer, src, "chan_median", smap).numel() % n == 0 else None
                if gi is not None:
                    entry["gamma"] = float(gain[gi])
                    entry["gain_ratio"] = float(gain[gi].abs() / gain.abs().median().clamp_min(1e-30))
            m = sp.med.get((layer, src))
            if m and m["after_chan"]:
                after_chan = torch.stack(m["after_chan"]).mean(0)
                before_chan = torch.stack(m["before_chan"]).mean(0)
                ra = float(after_chan[c]) / max(_mean(m["after_all"]), 1e-30)
                rb = float(before_chan[c]) / max(_mean(m["before_all"]), 1e-30)
                entry["ratio_after"], entry["ratio_before"] = ra, rb
                if ra > 1 and rb > 0:
                    raw = 1.0 - math.log(rb) / math.log(ra)
                    entry["gamma_share_raw"] = raw
                    entry["gamma_share"] = min(max(raw, 0.0), 1.0)
        # OTCs reading this channel (the CO sits at a projection input) ...
        entry["otc"] = [{"module": o["module"], "role": o["role"], "col": o["col"], "score": o["score"],
                         "ratio": o["ratio"], "cause": o["cause"]} for o in otc_in.get((layer, src, c), [])]
        # ... or the input channels driving it (the CO sits at a projection output)
        part = next((p for p in parts_cache[layer]
                     if p.output_position == position and p.role in cfg.otc_roles), None)
        if part is not None:
            x_mean = _stat(profile, layer, part.input_position, "chan_mean", smap)
            if x_mean is not None:
                cols = otc_cols[(layer, part.module, part.role)]
                drivers = _drivers(adapter, part, layer, c, x_mean, cols, cfg.drivers)
                entry["drivers"] = drivers
                entry["otc"] += [{"module": part.module, "role": part.role, "col": d["col"], "score": d["score"],
                                  "share": d["share"]} for d in drivers if d["otc"]]
        layers = sorted(co_layers[(position, c)])
        entry["layers"] = layers
        if position in HIDDEN_POSITIONS:
            rl = sorted(resid_layers.get(c, ()))
            entry["residual_layers"] = rl
            carried = layer in rl
        else:
            entry["residual_layers"] = None
            carried = False
        entry["persistence"] = "residual-carried" if carried else ("multi-layer" if len(layers) > 1
                                                                   else "single-layer")
        cnt = sp.counts.get((layer, src))
        rows = sp.rows.get((layer, src), 0)
        if cnt is not None and rows and c < cnt.numel():
            frac = float(cnt[c]) / rows
            entry["token_fraction"] = frac
            entry["kind"] = "channel-wise" if frac >= cfg.channelwise_fraction else "token-wise"
        else:
            entry["token_fraction"], entry["kind"] = None, None
        out.append(entry)
    return out
