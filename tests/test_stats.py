"""Streaming statistics against brute force on known tensors."""

from __future__ import annotations

import pytest
import torch

from outlierlab.tracing.stats import (
    PositionStats,
    StatsConfig,
    _host_views,
    median_error,
    zeroed_views,
)


def feed(st: PositionStats, x: torch.Tensor, batch: int, start: int = 0) -> None:
    for b in range(0, len(x), batch):
        st.update(x[b:b + batch], start + b)


@pytest.fixture
def data():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(6, 40, 24, generator=gen)
    x[2, 0, 5] = 900.0  # a massive entry in window 2, token 0, channel 5
    x[4, 0, 5] = -950.0  # the same (token, channel) in another window, larger: dedup keeps this one
    x[1, 7, 11] = 300.0
    x[:, :, 3] *= 40.0  # a channel-wise outlier
    return x


@pytest.mark.parametrize("batch", [1, 2, 6])
def test_matches_brute_force(data, batch):
    cfg = StatsConfig(top_k=5, median_samples=10_000, channel_median_rows=40, merge_every=2)
    st = PositionStats(cfg)
    feed(st, data, batch)
    r = st.finalize()
    a = data.abs()
    torch.testing.assert_close(r["chan_absmax"], a.amax((0, 1)))
    torch.testing.assert_close(r["chan_mean"], a.mean((0, 1)))
    torch.testing.assert_close(r["tok_absmax"], a.amax((0, 2)))
    torch.testing.assert_close(r["tok_absmax_mean"], a.amax(2).mean(0))
    assert r["absmax"] == pytest.approx(950.0)
    assert r["rows"] == 6 * 40
    # top entries, deduplicated by (token, channel) across windows, with signed value and window
    top = list(zip(r["top_value"].tolist(), r["top_window"].tolist(), r["top_token"].tolist(),
                   r["top_channel"].tolist()))
    assert top[0] == (-950.0, 4, 0, 5)
    assert top[1] == (300.0, 1, 7, 11)
    keys = [(t, c) for _, _, t, c in top]
    assert len(keys) == len(set(keys)) == 5
    brute = {}
    for w in range(6):
        for t in range(40):
            for c in range(24):
                v = float(data[w, t, c])
                if abs(v) > abs(brute.get((t, c), (0.0,))[0]):
                    brute[(t, c)] = (v, w)
    expected = sorted(brute.items(), key=lambda kv: -abs(kv[1][0]))[:5]
    assert [(t, c) for (t, c), _ in expected] == keys
    # channel medians over all rows (channel_median_rows >= rows: exact per window, averaged)
    per_window = torch.stack([data[w].abs().kthvalue(20, 0).values for w in range(6)])
    if batch == 1:
        torch.testing.assert_close(r["chan_median"], per_window.mean(0))


def test_median_within_stated_error():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(8, 256, 64, generator=gen) * 3.0
    cfg = StatsConfig(median_samples=4096)
    st = PositionStats(cfg)
    feed(st, x, 2)
    r = st.finalize()
    value_err, rank_err = median_error(cfg, r["samples"])
    flat = x.abs().flatten().sort().values
    lo = flat[int((0.5 - rank_err) * len(flat))] * (1 - value_err)
    hi = flat[int((0.5 + rank_err) * len(flat))] * (1 + value_err)
    assert lo <= r["median"] <= hi
    assert r["samples"] == 4 * 4096


def test_zeros_left_out_of_median():
    x = torch.relu(torch.randn(2, 64, 32, generator=torch.Generator().manual_seed(2)))
    st = PositionStats(StatsConfig())
    st.update(x)
    r = st.finalize()
    nz = x[x > 0]
    assert r["zero_fraction"] == pytest.approx(float((x == 0).float().mean()), abs=0.02)
    assert r["median"] == pytest.approx(float(nz.median()), rel=0.05)


def test_merge_equals_single_pass(data):
    cfg = StatsConfig(top_k=6, median_samples=512, channel_median_rows=8)
    whole = PositionStats(cfg)
    feed(whole, data, 1)
    first, second = PositionStats(cfg), PositionStats(cfg)
    feed(first, data[:3], 1, start=0)
    feed(second, data[3:], 1, start=3)
    first.merge_(second)
    a, b = whole.finalize(), first.finalize()
    for key in ("chan_absmax", "chan_mean", "chan_median", "tok_absmax", "tok_absmax_mean", "top_value",
                "top_window", "top_token", "top_channel"):
        torch.testing.assert_close(a[key], b[key], msg=key)
    assert a["median"] == b["median"] and a["rows"] == b["rows"]


def test_deterministic(data):
    cfg = StatsConfig(median_samples=100, channel_median_rows=8, seed=3)
    r1, r2 = PositionStats(cfg), PositionStats(cfg)
    feed(r1, data, 2)
    feed(r2, data, 2)
    a, b = r1.finalize(), r2.finalize()
    assert a["median"] == b["median"]
    torch.testing.assert_close(a["chan_median"], b["chan_median"])


def test_memory_does_not_grow_with_tokens():
    cfg = StatsConfig(top_k=8)
    st = PositionStats(cfg)
    x = torch.randn(1, 128, 16)
    st.update(x)

    def footprint():
        return sum(t.numel() for t in vars(st).values() if isinstance(t, torch.Tensor))

    before = footprint()
    for w in range(1, 50):
        st.update(x, w)
    st._flush()
    assert footprint() == before


def test_zeroed_views_are_aligned_zeroed_views_of_one_allocation():
    parts = [(3, torch.float64), (5, torch.int64), (7, torch.float32), (1, torch.float32)]
    views = zeroed_views(torch.device("cpu"), *parts)
    base = views[0].untyped_storage().data_ptr()
    for v, (numel, dtype) in zip(views, parts):
        assert (v.numel(), v.dtype) == (numel, dtype)
        assert v.untyped_storage().data_ptr() == base and v.data_ptr() % 64 == 0
        assert not v.any()
    views[2].fill_(1.0)  # views that do not overlap
    assert not views[0].any() and not views[1].any() and not views[3].any()


def test_a_positions_states_are_one_allocation():
    st = PositionStats(StatsConfig(top_k=8))
    st._allocate(12, 16, torch.device("cpu"))
    tensors = (st.max_state, st.sum_state, st.top_abs, st.top_val, st.top_window, st.top_token, st.top_channel)
    assert len({t.untyped_storage().data_ptr() for t in tensors}) == 1
    assert (st.top_abs < 0).all() and not st.max_state.any() and not st.sum_state.any()


def test_shape_change_is_an_error():
    st = PositionStats(StatsConfig())
    st.update(torch.randn(1, 8, 4))
    with pytest.raises(ValueError, match="shape changed"):
        st.update(torch.randn(1, 8, 5))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", ["outliers", "ties"])
def test_cpu_fast_path_equals_device_path(data, dtype, kind):
    """The eager CPU update (top-k prefilter, numpy channel medians, reused |x| buffer) computes exactly what
    the path compiled for GPUs computes, including on tensors full of ties (ReLU zeros, repeated values)."""
    from outlierlab.tracing.stats import _fixed_sample, _update_math

    x = data if kind == "outliers" else data.clamp(-1, 1).round()  # values in {-1, 0, 1}: ties everywhere
    x = x[:4].to(dtype).reshape(4 * 40, 24)
    c = StatsConfig(top_k=7, channel_median_rows=16)
    args = (torch.zeros(24 + 40), torch.zeros(2 * 24 + 40 + c.n_bins, dtype=torch.float64),
            _fixed_sample(160, 16, 0, x.device), _fixed_sample(160 * 24, 1000, 1, x.device), 4, 40, 16, 28, 28,
            float(c.log2_min), float(c.log2_max), c.n_bins)
    ref = _update_math(x, *args)
    fast = _update_math(x, *args, -1.0, torch.empty(160, 24))
    torch.testing.assert_close(fast[0], ref[0], rtol=0, atol=0)
    torch.testing.assert_close(fast[1], ref[1], rtol=0, atol=0)
    assert sorted(fast[2].tolist()) == sorted(ref[2].tolist())  # the same top values (ties may pick other keys)
    got = {(int(r), int(ch)): v for v, r, ch in zip(fast[3].tolist(), fast[4], fast[5])}
    assert all(float(x[r, ch]) == v for (r, ch), v in got.items())  # signed values at their own coordinates
    if kind == "outliers":
        want = {(int(r), int(ch)) for r, ch in zip(ref[4], ref[5])}
        assert set(got) == want
        # a floor (the smallest |x| of a full running top-k) keeps exactly the candidates at or above it
        floor = sorted(ref[2].tolist())[-10]
        floored = _update_math(x, *args, floor, torch.empty(160, 24))
        assert sorted(floored[2].tolist()) == sorted(v for v in ref[2].tolist() if v >= floor)


def test_floor_keeps_the_exact_top_k(data, monkeypatch):
    """The CPU path's running floor (entries below the k-th best never enter) leaves every statistic as the
    device path (no floor, no host sync) computes it."""
    import functools

    from outlierlab.tracing import stats as S

    cfg = StatsConfig(top_k=5, merge_every=100)
    host = PositionStats(cfg)
    feed(host, data, 1)
    assert host._floor > 0  # the floor was in use
    monkeypatch.setattr(S, "update_fn", lambda device, mode: functools.partial(S._update_math))
    device_path = PositionStats(cfg)
    feed(device_path, data, 1)
    a, b = host.finalize(), device_path.finalize()
    for key in a:
        if isinstance(a[key], torch.Tensor):
            torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)
        else:
            assert a[key] == b[key], key


def test_top_entries_do_not_depend_on_the_batching(data):
    """Exact ties (the same token in several windows, equal values at several keys) resolve the same way
    whatever the batch size: the smaller window, then the smaller (token, channel)."""
    x = data.clone()
    x[:, 0] = x[0, 0]  # token 0 identical in every window: ties across windows
    x[3, 5, :4] = 777.0  # four keys tied on value
    tops = []
    for batch in (1, 2, 3, 6):
        st = PositionStats(StatsConfig(top_k=6, merge_every=1))
        feed(st, x, batch)
        r = st.finalize()
        tops.append([r[f"top_{n}"].tolist() for n in ("value", "window", "token", "channel")])
    assert all(t == tops[0] for t in tops)
    _value, window, token, channel = tops[0]
    assert (token[:4], channel[:4], window[:4]) == ([5, 5, 5, 5], [0, 1, 2, 3], [3, 3, 3, 3])
    assert all(w == 0 for w, t in zip(window, token) if t == 0)  # ties across windows: the first window


def test_finalizing_many_positions_together_equals_one_at_a_time():
    """finalize_all over positions of several shapes, with different numbers of pending candidates (the padded
    merge), gives each position exactly what finalizing it alone gives."""
    import copy

    from outlierlab.tracing.stats import finalize_all

    gen = torch.Generator().manual_seed(1)
    cfg = StatsConfig(top_k=6, merge_every=100)  # every candidate still pending at the end
    stats = []
    for i, (windows, tokens, channels) in enumerate([(4, 16, 24), (6, 16, 24), (2, 16, 24), (4, 8, 40), (3, 8, 40)]):
        x = torch.randn(windows, tokens, channels, generator=gen)
        x[i % windows, i % tokens, i % channels] = 500.0 + i  # a massive entry per position
        x[:, i % tokens, 0] = 77.0  # ties across windows
        st = PositionStats(cfg)
        feed(st, x, batch=2)
        stats.append(st)
    alone = [finalize_all([copy.deepcopy(st)])[0] for st in stats]
    together = finalize_all([copy.deepcopy(st) for st in stats])
    assert len({len(st._pending) for st in stats}) > 1  # the rows were padded
    for a, b in zip(alone, together):
        assert a.keys() == b.keys()
        for key, want in a.items():
            got = b[key]
            if isinstance(want, torch.Tensor):
                assert torch.equal(got, want) and got.dtype == want.dtype, key
            else:
                assert got == want, key


def test_host_views_cover_each_part_in_order():
    """_host_views: per dtype one view per part, in order, each equal to its part, empty parts included (on a
    GPU the lane's finalize test checks the copy into pinned blocks)."""
    parts = {torch.float32: [torch.arange(5.0), torch.empty(0), torch.arange(3.0) - 7],
             torch.int64: [torch.arange(4)]}
    views, fill = _host_views(parts)
    fill()
    for dtype, ps in parts.items():
        assert len(views[dtype]) == len(ps)
        for v, p in zip(views[dtype], ps):
            assert v.dtype == dtype and torch.equal(v, p)
