"""Rich terminal summaries of a profile."""

from __future__ import annotations

from collections import defaultdict

from rich.console import Console
from rich.table import Table

from ..fmt import num
from ..tracing.result import Profile


def group_massive(mas: list[dict]) -> list[dict]:
    """Group MA records by (token index, channel): first layer/position seen, layers spanned, largest value."""
    groups: dict[tuple[int, int], dict] = {}
    for m in mas:
        key = (m["token_index"], m["channel"])
        g = groups.get(key)
        if g is None:
            g = groups[key] = {"token_index": m["token_index"], "channel": m["channel"], "token": m["token"],
                               "first_layer": m["layer"], "first_position": m["position"], "layers": set(),
                               "value": m["value"]}
        g["layers"].add(m["layer"])
        if abs(m["value"]) > abs(g["value"]):
            g["value"], g["token"] = m["value"], m["token"]
    out = sorted(groups.values(), key=lambda g: -abs(g["value"]))
    for g in out:
        g["layers"] = sorted(g["layers"])
    return out




def print_profile_summary(p: Profile, console: Console | None = None) -> None:
    console = console or Console()
    info = p.model_info
    console.print(f"[bold]{info.get('id', '?')}[/] ({info.get('model_type')}, {info.get('n_layers')} layers, "
                  f"d={info.get('hidden_size')}) on {p.data_info.get('source', '?')}: "
                  f"{p.data_info.get('n_samples', '?')} windows x {p.data_info.get('seq_len', '?')} tokens")

    table = Table(title="max |x| per layer", show_lines=False)
    for col in ("layer", "block.out", "mlp.down_in", "block.out top entry (token, channel)"):
        table.add_column(col, justify="right")
    for layer in p.layers:
        row = [str(layer)]
        for pos in ("block.out", "mlp.down_in"):
            r = p.results.get((layer, pos))
            row.append(num(r.stats["absmax"]) if r else "-")
        r = p.results.get((layer, "block.out"))
        if r is not None and len(r.stats["top_value"]):
            row.append(f"t{int(r.stats['top_token'][0])}, c{int(r.stats['top_channel'][0])}")
        else:
            row.append("-")
        table.add_row(*row)
    console.print(table)

    groups = group_massive(p.massive_activations)
    if groups:
        t = Table(title=f"massive activations ({len(p.massive_activations)} records, {len(groups)} distinct)")
        for col in ("token idx", "token", "channel", "max value", "first seen", "layers"):
            t.add_column(col)
        for g in groups[:20]:
            layers = g["layers"]
            span = f"{layers[0]}-{layers[-1]} ({len(layers)})" if len(layers) > 1 else str(layers[0])
            t.add_row(str(g["token_index"]), repr(g["token"]), str(g["channel"]), num(g["value"]),
                      f"L{g['first_layer']} {g['first_position']}", span)
        console.print(t)
    else:
        console.print("no massive activations by the rule "
                      f"|x| > {p.config.detect.ma_abs:g} and > {p.config.detect.ma_rel:g} x median")

    by_pos: dict[str, dict[int, int]] = defaultdict(lambda: defaultdict(int))
    layers_of: dict[str, set] = defaultdict(set)
    for c in p.channel_outliers:
        by_pos[c["position"]][c["channel"]] += 1
        layers_of[c["position"]].add(c["layer"])
    if by_pos:
        t = Table(title=f"channel-wise outliers (median |x| >= {p.config.detect.co_k:g} x tensor median)")
        for col in ("position", "layers with COs", "most frequent channels (layers)"):
            t.add_column(col)
        for pos_name in [d["name"] for d in p.adapter["positions"]]:
            if pos_name not in by_pos:
                continue
            chans = sorted(by_pos[pos_name].items(), key=lambda kv: -kv[1])[:6]
            t.add_row(pos_name, str(len(layers_of[pos_name])), ", ".join(f"{c} ({n})" for c, n in chans))
        console.print(t)
    tm = p.timings
    console.print(f"traced in {tm.get('trace_s', 0):.1f} s (+{tm.get('weights_s', 0):.1f} s weight statistics)")

