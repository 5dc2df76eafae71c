"""tracing/overlap.py: the order of stream waits and replays, and the watch for in-place writes, run on the CPU
with stand-in streams (the CUDA lane runs the real ones through every profile)."""

from __future__ import annotations

import contextlib

import pytest
import torch
from torch import nn

from outlierlab.runtime import run
from outlierlab.testing import TINY_FAMILIES
from outlierlab.tracing import kernels
from outlierlab.tracing.overlap import Overlap
from outlierlab.tracing.stats import PositionStats, StatsConfig


class Logged(Overlap):
    """Streams as names; every wait, stream switch and replay goes to ``log``."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.log: list[tuple] = []
        self.current = "main"

    def _side(self, device):
        return "side"

    def _main(self, device):
        return "main"

    def _wait(self, waiter, waited):
        self.log.append(("wait", waiter, waited))

    @contextlib.contextmanager
    def _on(self, stream):
        prev, self.current = self.current, stream
        try:
            yield
        finally:
            self.current = prev

    def add(self, key, x):
        """Queue the replay of ``x``: it logs the stream it ran on and the values it read."""
        self.replay(key, x, lambda: self.log.append(("replay", key, self.current, x.clone())))

    def replays(self):
        return [(e[1], e[2]) for e in self.log if e[0] == "replay"]


def watched(ov, keys):
    """A first forward over ``keys``: deferred like any other, and joined at its end."""
    with ov.watching():
        for key in keys:
            ov.add(key, torch.ones(2))
    assert ov.replays() == [(k, "side") for k in keys] and not ov.busy()
    assert ov.log[-1] == ("wait", "main", "side") and ov.take_tainted() == set()
    ov.log.clear()


def queued(ov):
    return [k for _, k, _, _ in ov._queue] + [k for items in ov._held.values() for _, k, _, _ in items]


def test_a_layer_is_issued_on_the_side_stream_when_the_next_begins():
    ov = Logged()
    watched(ov, [(0, "a"), (0, "b"), (1, "a"), (2, "a")])
    ov.add((0, "a"), torch.ones(2))
    ov.add((0, "b"), torch.ones(2))
    assert ov.log == []  # queued
    ov.add((1, "a"), torch.ones(2))
    # the side stream waits for the model's, then runs layer 0
    assert ov.log[0] == ("wait", "side", "main")
    assert ov.replays() == [((0, "a"), "side"), ((0, "b"), "side")]
    ov.log.clear()
    ov.add((2, "a"), torch.ones(2))
    # layer 0 waited for by the model's stream (and let go) before layer 1 is issued
    assert ov.log[:2] == [("wait", "main", "side"), ("wait", "side", "main")]
    assert ov.replays() == [((1, "a"), "side")]
    assert queued(ov) == [(2, "a"), (1, "a")]
    ov.log.clear()
    ov.join()
    assert ov.replays() == [((2, "a"), "side")] and ov.log[-1] == ("wait", "main", "side")
    assert queued(ov) == [] and not ov.busy()


def test_the_queue_is_issued_early_past_max_bytes():
    ov = Logged(max_bytes=3 * 4 * 2)
    watched(ov, [(0, n) for n in "abcd"])
    for name in "abcd":
        ov.add((0, name), torch.ones(2))
    assert ov.replays() == [((0, n), "side") for n in "abc"] and queued(ov) == [(0, "d"), (0, "a"), (0, "b"),
                                                                                  (0, "c")]


def test_positions_no_watched_forward_has_seen_run_on_the_models_stream():
    """A tracer driven without a watched first forward, or a position first reached later (an expert no
    token of the first batch was routed to), is not deferred: nothing checked it for in-place writes. Nor is
    a tensor that has no version counter (made in inference mode before the watch)."""
    ov = Logged()
    with torch.inference_mode():
        old = torch.ones(2)
    with ov.watching():
        ov.add((0, "a"), torch.ones(2))
        ov.add((0, "old"), old)
    ov.log.clear()
    ov.add((0, "a"), torch.ones(2))
    ov.add((0, "old"), old)
    ov.add((0, "expert.7"), torch.ones(2))
    assert ov.replays() == [((0, "a"), "side"), ((0, "old"), "main"), ((0, "expert.7"), "main")]
    where = [e[1] if e[0] == "replay" else e for e in ov.log]
    assert where.index(("wait", "main", "side")) < where.index((0, "old"))  # after the side stream's work


@pytest.mark.parametrize("write", ["in place", "base", "out="])
def test_a_tensor_written_while_it_would_be_held_keeps_its_position_on_the_models_stream(write):
    """Held from its hook until the second layer change after it: a write one layer later marks the position
    (unsafe from now on, and tainted: its deferred replay may have read the new values), a write two layers
    later does not (the model's stream has waited for its statistics by then)."""
    ov = Logged()
    with ov.watching():
        base = torch.arange(8.0)
        x = base[:4]  # the traced tensor may be a view
        late = torch.arange(4.0)
        ov.add((0, "a"), x)
        ov.add((0, "late"), late)
        ov.add((0, "b"), torch.ones(3))
        ov.add((1, "a"), torch.ones(3))
        torch.ones(4).mul_(5)  # another tensor: nothing happens
        if write == "in place":
            x.mul_(-1)
        elif write == "base":
            base.add_(1)
        else:
            torch.add(torch.ones(4), torch.ones(4), out=x)
        ov.add((2, "a"), torch.ones(3))  # layer 0 would be let go here
        late.mul_(-1)
    assert ov.replays()[0] == ((0, "a"), "side")
    assert ov.unsafe == {(0, "a")} and ov.watched == {(0, "a"), (0, "late"), (0, "b"), (1, "a"), (2, "a")}
    assert ov.take_tainted() == {(0, "a")} and ov.take_tainted() == set()
    ov.log.clear()
    ov.add((0, "a"), x)  # from now on: on the model's stream, at once
    ov.add((0, "b"), torch.ones(3))
    assert ov.replays() == [((0, "a"), "main")] and queued(ov) == [(0, "b")]


def test_past_max_bytes_the_watch_lets_a_layer_go_early_and_keeps_it_on_the_models_stream():
    """The watch holds up to two layers for its checks; past the cap everything is joined and the oldest layer
    goes early, and since the overlap would hold it longer than it was checked, its positions are not
    deferred."""
    ov = Logged(max_bytes=3 * 4 * 10)
    with ov.watching():
        for layer in range(3):
            ov.add((layer, "a"), torch.ones(10))
            ov.add((layer, "b"), torch.ones(10))
        assert ov._seen_bytes < 3 * 4 * 10
    assert ov.unsafe == {(0, "a"), (0, "b"), (1, "a"), (1, "b")}
    ov.log.clear()
    for layer in range(3):
        ov.add((layer, "a"), torch.ones(10))
    ov.join()
    assert ov.replays() == [((0, "a"), "main"), ((1, "a"), "main"), ((2, "a"), "side")]


def test_only_gpu_profiles_of_enough_forwards_are_watched(monkeypatch):
    from outlierlab.testing import tiny_model
    from outlierlab.tracing import ProfileConfig, StatsConfig, profiler

    model = tiny_model("llama")
    tracer = profiler.Tracer(profiler.get_adapter(model), ProfileConfig())
    n = tracer.overlap.MIN_FORWARDS
    assert tracer.first_forward(model, 10 * n, 1) is None  # a CPU model: no graphed replays to defer
    monkeypatch.setattr(profiler, "input_device", lambda m: torch.device("cuda", 0))
    assert tracer.first_forward(model, n - 1, 1) is None
    assert tracer.first_forward(model, 2 * n - 2, 2) is None  # n - 1 forwards of 2 windows
    assert tracer.first_forward(model, n, 1) == tracer.watched
    assert tracer.first_forward(model, 2 * n - 1, 2) == tracer.watched  # n forwards
    off = profiler.Tracer(profiler.get_adapter(model), ProfileConfig(stats=StatsConfig(overlap=False)))
    assert off.overlap is None and off.first_forward(model, 10 * n, 1) is None


def test_under_the_watch_the_statistics_own_tensors_stay_inference_tensors():
    """The watch takes the model's tensors out of inference mode; the tracer's states are made in it, as in an
    unwatched forward, while the traced tensor keeps its version counter."""
    from outlierlab.runtime import installed
    from outlierlab.testing import random_windows, tiny_model
    from outlierlab.tracing import ProfileConfig, profiler

    model = tiny_model("llama")
    tracer = profiler.Tracer(profiler.get_adapter(model), ProfileConfig())
    seen = []
    real = tracer._trace
    tracer._trace = lambda layer, name, x: (seen.append((x.is_inference(), torch.is_inference_mode_enabled())),
                                            real(layer, name, x))
    with installed(model, tracer):
        run(model, random_windows(model, 2, 16), 2, logits=False, first_batch=tracer.watched)
    assert seen and all(t == (False, True) for t in seen)
    states = [st.max_state for st in tracer.stats.values()]
    assert states and all(s.is_inference() for s in states)


def test_the_watch_finds_a_models_in_place_activation():
    """Planted: a ReLU(inplace=True) rewrites the first linear's output after its hook, before the statistics
    deferred to the next layer read it (here they do read the new values); the second linear's output is never
    written."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 6), nn.ReLU(inplace=True), nn.Linear(6, 6), nn.Tanh())
    ov = Logged()
    handles = [model[i].register_forward_hook(lambda m, a, out, i=i: ov.add((i, "out"), out)) for i in (0, 2)]
    x = torch.randn(3, 6)
    try:
        with torch.inference_mode(), ov.watching():
            want = model[0](x)
            model(x)
        ov.join()
    finally:
        for h in handles:
            h.remove()
    assert ov.unsafe == {(0, "out")} and ov.watched == {(0, "out"), (2, "out")}
    assert ov.take_tainted() == {(0, "out")}  # the tracer traces it again (test below)
    # the model's own forward (the second replay of layer 0; the first read ``want``)
    traced = [e for e in ov.log if e[0] == "replay" and e[1] == (0, "out")][1]
    assert torch.equal(traced[3], want.relu()) and (want < 0).any()


def test_run_runs_the_first_forward_through_first_batch_once():
    wrapped = []

    def first(forward):
        wrapped.append(1)
        return ("first", forward())

    calls = []
    outs = []
    model = nn.Module()
    with pytest.MonkeyPatch.context() as mp:
        import outlierlab.runtime.forward as fw

        mp.setattr(fw, "call", lambda m, chunk, w0, logits: calls.append(w0) or w0)
        run(model, torch.zeros(5, 4, dtype=torch.long), 2, first_batch=first,
            on_batch=lambda batch, out: outs.append(out))
    assert wrapped == [1] and calls == [0, 2, 4] and outs == [("first", 0), 2, 4]


def test_a_tainted_position_is_traced_again_alone_from_a_fresh_state(monkeypatch):
    """The watched forward's statistics of a tainted position are dropped and the first batch is traced again
    for it alone: the profile equals one without the overlap, and the first batch ran twice."""
    from outlierlab.runtime import installed
    from outlierlab.runtime.forward import call
    from outlierlab.testing import random_windows, tiny_model
    from outlierlab.tracing import ProfileConfig, StatsConfig, profiler

    model = tiny_model("llama")
    ids = random_windows(model, 4, 16)
    plain = profiler.Tracer(profiler.get_adapter(model), ProfileConfig(stats=StatsConfig(overlap=False)))
    with installed(model, plain):
        run(model, ids, 2, logits=False)
    tracer = profiler.Tracer(profiler.get_adapter(model), ProfileConfig())
    key = (1, "mlp.act")
    taken = iter([{key}])
    monkeypatch.setattr(tracer.overlap, "take_tainted", lambda: next(taken))  # as if written in place
    from outlierlab.tracing.stats import PositionStats

    updates = []
    real = PositionStats.update
    monkeypatch.setattr(PositionStats, "update", lambda st, x, w0=0: (updates.append(st.key), real(st, x, w0))[1])
    starts = []
    monkeypatch.setattr("outlierlab.runtime.forward.call",
                        lambda m, chunk, w0, logits: (starts.append(w0), call(m, chunk, w0, logits))[1])
    with installed(model, tracer):
        run(model, ids, 2, logits=False, first_batch=tracer.watched)
    assert starts == [0, 0, 2]  # the first batch again, for the tainted position
    n = (len(updates) - 1) // 2  # positions a forward traces
    assert updates[n] == key and updates[:n] == updates[n + 1:] and updates.count(key) == 3
    want, got = plain.results(), tracer.results()
    assert got.keys() == want.keys()
    for k, r in want.items():
        for name, v in r.items():
            if isinstance(v, torch.Tensor):
                assert torch.equal(got[k][name], v), (k, name)
            else:
                assert got[k][name] == v, (k, name)


@pytest.mark.parametrize("family", sorted(TINY_FAMILIES))
def test_no_planted_family_writes_a_traced_tensor_in_place(family, monkeypatch):
    """What the watch would find in the 12 families' own code (transformers' modules, eager attention on the
    CPU): no traced tensor is written in place later in its forward, so no first batch is traced twice. A
    failure here is not a wrong profile (the watch handles it), but a second pass over the first batch."""
    from outlierlab.runtime import installed
    from outlierlab.runtime.forward import call
    from outlierlab.testing import random_windows, tiny_model
    from outlierlab.tracing import ProfileConfig, profiler
    from outlierlab.tracing.stats import PositionStats

    model = tiny_model(family)
    seen = []
    real = PositionStats.update
    monkeypatch.setattr(PositionStats, "update", lambda st, x, w0=0: (seen.append((st.key, x, x._version)),
                                                                       real(st, x, w0))[1])
    tracer = profiler.Tracer(profiler.get_adapter(model), ProfileConfig())
    with installed(model, tracer), torch.inference_mode(False), torch.no_grad():
        call(model, random_windows(model, 2, 16), 0, logits=False)
    assert seen and all(not x.is_inference() for _, x, _ in seen)
    assert [key for key, x, version in seen if x._version != version] == []


def test_the_eager_update_joins_the_overlap_before_its_math():
    class Joins:
        n = 0

        def join(self):
            self.n += 1

    st = PositionStats(StatsConfig())
    st.overlap, st.key = Joins(), (0, "x")
    for i in range(3):  # the eager path shares a scratch buffer with the replays' device: joined every time
        st.update(torch.randn(2, 8, 4), window0=2 * i)
    assert st.overlap.n == 3


def test_only_a_capture_joins_before_a_graph_is_taken(monkeypatch):
    # a first update that replays a graph already captured queues it like any other (joining at each of a 7B
    # profile's 449 first updates ran its first forward serialized); a capture's warm-up reads shared rows
    captured = []

    class Stand:
        def __init__(self, x, *args):
            captured.append(tuple(x.shape))

    monkeypatch.setattr(kernels, "_GRAPHS", {})
    monkeypatch.setattr(kernels, "GraphedUpdate", Stand)
    monkeypatch.setattr(torch.cuda, "device", lambda dev: contextlib.nullcontext())
    joins = []
    idx = torch.arange(4)
    for shape in [(8, 4), (8, 4), (16, 4), (8, 4)]:
        kernels.graphed(torch.zeros(shape), 1, 8, idx, idx, 4, -20, 20, 8, ring=4,
                        before_capture=lambda: joins.append(len(captured)))
    assert captured == [(8, 4), (16, 4)] and joins == [0, 1]
