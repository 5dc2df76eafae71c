"""The runtime: one forward loop (placement, window offset, batch shape) and one registry (explicit order,
removal on every exit path, nothing left on the model)."""

from __future__ import annotations

import gc

import pytest
import torch

from outlierlab.adapters import get_adapter
from outlierlab.mitigation import TMAConfig, mitigate
from outlierlab.quantization import quantize_
from outlierlab.runtime import (
    ORDER,
    Entry,
    FunctionEntry,
    call,
    frozen_gc,
    input_device,
    install,
    installed,
    registry,
    run,
    uninstall,
)
from outlierlab.testing import TINY_FAMILIES, random_windows, tiny_model
from outlierlab.tracing import ProfileConfig, profile
from outlierlab.tracing.hooks import attach_positions


def hook_count(model) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


class Tag(Entry):
    """Appends its name to a shared log from a pre-hook on one module."""

    def __init__(self, name, order, module, log):
        self.name, self.order, self.module, self.log = name, order, module, log

    def attach(self, model, hooks, reg):
        hooks.pre(self.module, lambda m, args: self.log.append(self.name))


def test_hooks_run_in_the_declared_order_whatever_the_order_of_installation():
    model = tiny_model("llama")
    down = model.model.layers[0].mlp.down_proj
    ids = random_windows(model, 1, 8)
    log: list[str] = []
    trace = install(model, Tag("trace", ORDER["trace"], down, log))
    quant = install(model, Tag("quant", ORDER["quant.acts"], down, log))
    tma = install(model, Tag("tma", ORDER["mitigation"], down, log))
    call(model, ids)
    assert log == ["tma", "quant", "trace"]
    assert [e.name for e in registry(model).entries] == ["tma", "quant", "trace"]
    log.clear()
    uninstall(model, quant)
    call(model, ids)
    assert log == ["tma", "trace"]
    uninstall(model, tma)
    uninstall(model, trace)
    assert hook_count(model) == 0 and not registry(model).entries


def test_installed_removes_on_error_and_a_failed_attach_leaves_nothing():
    model = tiny_model("llama")
    seen = []

    class Broken(Entry):
        name = "broken"

        def attach(self, model, hooks, reg):
            hooks.pre(model.model.layers[0], lambda m, a: None)
            model.model.norm.weight.data.mul_(2)
            raise RuntimeError("boom")

        def detach(self, model):
            seen.append("detached")
            model.model.norm.weight.data.div_(2)

    before = model.model.norm.weight.detach().clone()
    with pytest.raises(RuntimeError, match="boom"):
        install(model, Broken())
    assert seen == ["detached"] and torch.equal(model.model.norm.weight, before)
    assert hook_count(model) == 0
    probe = FunctionEntry("probe", ORDER["probe"], lambda h: h.pre(model.model.norm, print))
    with pytest.raises(KeyboardInterrupt), installed(model, probe):
        assert hook_count(model) == 2  # the probe and the registry's batch-shape hook
        raise KeyboardInterrupt
    assert hook_count(model) == 0 and not registry(model).entries


def test_run_places_batches_and_reports_the_window_offset():
    model = tiny_model("opt")  # flattens its FFN tokens
    ids = random_windows(model, 5, 12)
    seen = []

    def declare(hooks):
        fc1 = model.model.decoder.layers[0].fc1
        hooks.pre(fc1, lambda m, args: seen.append((reg.batch.window0, tuple(reg.batch.as_3d(args[0]).shape))))

    reg = registry(model)
    with installed(model, FunctionEntry("probe", ORDER["probe"], declare)):
        run(model, ids, batch_size=2, first_window=10)
    assert seen == [(10, (2, 12, 64)), (12, (2, 12, 64)), (14, (1, 12, 64))]
    assert input_device(model) == torch.device("cpu")


@pytest.mark.parametrize("family", sorted(TINY_FAMILIES))
def test_a_pass_that_reads_no_logits_skips_the_output_layer_and_traces_the_same(family):
    """logits=False: the output layer runs on the last position only, and what the hooks see is unchanged."""
    model = tiny_model(family)
    ids = random_windows(model, 2, 16)
    full, last = call(model, ids).logits, call(model, ids, logits=False).logits
    assert full.shape[1] == 16 and last.shape[1] == 1
    torch.testing.assert_close(last[:, 0], full[:, -1], rtol=1e-5, atol=1e-5)
    head = model.get_output_embeddings()
    rows = []
    with installed(model, FunctionEntry("probe", ORDER["probe"], lambda h: h.pre(head, lambda m, a: rows.append(
            a[0].shape[1])))):
        run(model, ids, 2, logits=False)
        run(model, ids, 2)
    assert rows == [1, 16]
    # the profile (no logits) sees what a pass with logits sees at every traced position
    prof = profile(model, ids, ProfileConfig(weights=False, batch_size=2))
    seen: dict = {}

    def keep(layer, name, x):
        seen[(layer, name)] = max(seen.get((layer, name), 0.0), float(x.abs().amax()))

    entry = FunctionEntry("observe", ORDER["trace"], lambda h: attach_positions(h, get_adapter(model), keep))
    with installed(model, entry):
        run(model, ids, 2)
    traced = {(layer, name): r.stats["absmax"] for (layer, name), r in prof.results.items() if not r.same_as}
    assert traced and all(v == pytest.approx(seen[k], rel=1e-6) for k, v in traced.items())


def test_runs_leave_what_existed_before_them_out_of_the_collector():
    """Objects that exist when the outermost run starts are frozen (not walked by the collector) until it ends,
    also when it fails; objects created inside stay tracked, and nothing stays frozen after the run."""
    model = tiny_model("llama")
    ids = random_windows(model, n=2, seq_len=8)
    assert gc.get_freeze_count() == 0
    seen = []
    with frozen_gc():
        before = gc.get_freeze_count()
        assert before > 0
        run(model, ids, 1, on_batch=lambda b, out: seen.append(gc.get_freeze_count()))
        # the nested block neither froze more nor unfroze (frozen objects freed by refcount leave the count)
        assert len(seen) == 2 and all(0 < n <= before for n in seen)
        assert 0 < gc.get_freeze_count() <= before
    assert gc.get_freeze_count() == 0
    with pytest.raises(RuntimeError), frozen_gc():
        raise RuntimeError("a failing stage")
    assert gc.get_freeze_count() == 0
    profile(model, ids, ProfileConfig(weights=False))
    assert gc.get_freeze_count() == 0


def test_mitigation_and_quantization_share_the_registry():
    model = tiny_model("llama")
    ids = random_windows(model, 2, 16)
    result = mitigate(model, [TMAConfig()], ids)
    with quantize_(model, "w4a4kv4", ids) as state:
        assert [e.name for e in registry(model).entries] == ["tma", "quant", "quant.kv"]
        assert state.describe()["name"] == "quant"
        assert torch.isfinite(call(model, ids).logits).all()
    assert [e.name for e in registry(model).entries] == ["tma"]
    result.remove()
    assert hook_count(model) == 0 and not registry(model).entries
    assert model.config._attn_implementation == "eager"


@pytest.mark.parametrize(("family", "store"), [("llama", "cpu"), ("gpt2", "cpu"), ("gemma2", "cpu"),
                                               ("llama", "disk")])
def test_weight_journal_restores_every_method_bit_for_bit(family, store):
    """Each weight-editing method (rotate unties the head and edits every weight; OTC fine-tunes) is undone
    exactly: the same Parameter objects, the same bits, the same config."""
    from outlierlab.mitigation import MitigationError
    from outlierlab.runtime.journal import WeightJournal
    from outlierlab.testing import mitigation_modes

    model = tiny_model(family)
    ids = random_windows(model, 2, 16)
    params = dict(model.named_parameters(remove_duplicate=False))
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    config = model.config.to_dict()
    for name, cfg in mitigation_modes().items():
        with WeightJournal(model, store):
            try:
                mitigate(model, [cfg], ids).remove()
            except MitigationError:
                continue
        assert dict(model.named_parameters(remove_duplicate=False)).keys() == params.keys()
        assert all(p is params[k] for k, p in model.named_parameters(remove_duplicate=False)), name
        assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items()), name
        assert (model.get_output_embeddings().weight is model.get_input_embeddings().weight) == tied, name
        assert model.config.to_dict() == config, name
