"""lm-evaluation-harness adapter: score a mitigated, fake-quantized model on ``lm_eval`` tasks.

Optional: needs the ``eval`` extra (``pip install 'outlierlab[eval]'``, i.e. ``lm_eval``). Usage::

    import lm_eval
    from outlierlab.evaluation.lm_eval import OutlierlabLM

    lm = OutlierlabLM(model="smollm2-135m", methods="smoothquant", quant="w8a8-tensor")
    lm_eval.simple_evaluate(model=lm, tasks=["my_task"], task_manager=lm_eval.tasks.TaskManager(include_path=DIR))

or from the command line: ``outlierlab lm-eval --tasks my_task --include-path DIR --method smoothquant
--quant w8a8-tensor``. :func:`register` adds the model name ``outlierlab`` to lm_eval's registry
(``lm_eval.simple_evaluate(model="outlierlab", model_args="model=...,methods=...,quant=...")``).

What the wrapper does: loads the model (``max_memory`` places it with accelerate, offloading what does not fit)
or takes a given one, which it deep-copies (the caller's model is never changed) unless ``in_place`` (the default
for a model that accelerate dispatched, which no deep copy can hold): then the originals wait in a
:class:`~outlierlab.runtime.journal.WeightJournal` and :meth:`OutlierlabLM.close` gives the model back as it was,
applies ``outlierlab.mitigation.mitigate(methods)`` and ``outlierlab.quantization.quantize_(quant)`` with
calibration windows from ``calib`` (``brown:calib`` by default, only built when a method or the quantization
needs them), then answers:

- ``loglikelihood``: sum of log-probabilities of the continuation tokens given the context, and whether they
  are the greedy tokens. Context and continuation are tokenized together and split where the context's
  tokens end (trailing spaces of the context move to the continuation); an empty context is replaced by the
  BOS (else EOS) token; inputs longer than ``max_length`` keep their last tokens. Requests are batched by
  length, right-padded (no attention mask is needed: causal attention never looks right).
- ``loglikelihood_rolling``: the text's log-likelihood over windows of ``max_length`` predicted tokens, the
  first conditioned on BOS/EOS, later ones on as much preceding text as fits.
- ``generate_until``: greedy decoding (``model.generate``), cut at the first stop sequence.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F

from ..errors import OutlierlabError
from ..runtime import call, input_device, offload
from ..runtime.journal import WeightJournal

try:  # optional dependency
    from lm_eval.api.model import LM as _LMBase
    from lm_eval.api.registry import register_model as _register_model

    HAVE_LM_EVAL = True
except ImportError:  # pragma: no cover - exercised only without the extra
    _LMBase = object
    HAVE_LM_EVAL = False

    def _register_model(*names):
        return lambda cls: cls


INSTALL_HINT = "the lm-evaluation-harness adapter needs lm_eval: pip install 'outlierlab[eval]'"


def _split_methods(methods) -> list:
    if methods is None:
        return []
    if isinstance(methods, str):
        return [m.strip() for m in methods.replace("+", ",").split(",") if m.strip() and m.strip() != "none"]
    return [m for m in methods if m != "none"]


class OutlierlabLM(_LMBase):
    """An ``lm_eval`` model: an outlierlab-loaded causal LM, mitigated and fake-quantized (module docstring)."""

    def __init__(self, model: Any = "smollm2-135m", methods: Any = "none", quant: Any = "fp",
                 tokenizer=None, calib: Any = "brown:calib", calib_samples: int = 16, seq_len: int = 512,
                 batch_size: int | str = 4, max_length: int | None = None, max_gen_toks: int = 256,
                 device: str = "cpu", dtype: str = "float32", max_memory: str | None = None,
                 in_place: bool | None = None, **_ignored) -> None:
        if not HAVE_LM_EVAL:
            raise OutlierlabError(INSTALL_HINT)
        super().__init__()
        from ..api import as_windows
        from ..data import DataConfig
        from ..mitigation import mitigate
        from ..models.loader import LoadedModel, load_model, max_positions
        from ..quantization import get_quant, quantize_

        self._journal = None
        if isinstance(model, (LoadedModel, torch.nn.Module)):
            module = model.model if isinstance(model, LoadedModel) else model
            if in_place is None:
                in_place = offload.is_offloaded(module) or len(set(getattr(module, "hf_device_map", {}).values())) > 1
            if in_place:
                self._journal = WeightJournal(module).__enter__()
            else:
                module = copy.deepcopy(module)
            if isinstance(model, LoadedModel):
                lm = LoadedModel(module, model.tokenizer, model.source, model.device, model.dtype, dict(model.info))
            elif tokenizer is None:
                raise OutlierlabError("OutlierlabLM(model=<nn.Module>) needs tokenizer=")
            else:
                lm = LoadedModel(module, tokenizer, None, input_device(module), next(module.parameters()).dtype, {})
        else:
            lm = load_model(str(model), str(device), str(dtype), max_memory=max_memory)
        self.lm = lm
        self.model = lm.model.eval()
        self.tokenizer = lm.tokenizer
        self.quant = get_quant(quant)
        self.methods = _split_methods(methods)
        self.batch_size_per_gpu = 4 if str(batch_size) == "auto" else int(str(batch_size).split(":")[0])
        self.max_gen_toks = int(max_gen_toks)
        limit = max_positions(self.model)
        self._max_length = int(max_length) if max_length else min(limit or 2048, 2048)
        calib_windows = None
        if self.methods or self.quant.needs_calibration:
            cfg = DataConfig(source=str(calib), seq_len=int(seq_len), n_samples=int(calib_samples))
            calib_windows = as_windows(cfg, lm)
        try:
            self.mitigation = mitigate(self.model, self.methods, calib_windows, self.tokenizer)
            self.state = quantize_(self.model, self.quant, calib_windows, restore=False)  # the journal restores
        except BaseException:
            if self._journal is not None:
                self._journal.__exit__(None, None, None)
            raise
        self._device = input_device(self.model)
        tok = self.tokenizer
        self.prefix_token_id = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else (self.prefix_token_id or 0)
        probe = tok("a").input_ids
        self.add_bos = bool(tok.bos_token_id is not None and probe and probe[0] == tok.bos_token_id)

    # -- lm_eval interface -------------------------------------------------------------------------------
    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    def describe(self) -> dict:
        return {"model": self.lm.info, "methods": self.methods or ["none"], "quant": self.quant.to_dict(),
                "quant_summary": self.quant.describe(), "mitigation": self.mitigation.applied}

    def tok_encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False).input_ids)

    def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        n_spaces = len(context) - len(context.rstrip())
        if n_spaces:
            continuation = context[-n_spaces:] + continuation
            context = context[:-n_spaces]
        whole = self.tok_encode(context + continuation)
        ctx = self.tok_encode(context)
        if self.add_bos or not ctx:
            ctx = [self.prefix_token_id] + ctx
            whole = [self.prefix_token_id] + whole
        return ctx, whole[len(ctx):]

    @torch.inference_mode()
    def _score(self, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """(sum log p(continuation), greedy?) for (context ids, continuation ids) pairs, batched by length."""
        results: list[tuple[float, bool] | None] = [None] * len(pairs)
        items = []
        for i, (ctx, cont) in enumerate(pairs):
            if not cont:
                results[i] = (0.0, True)
                continue
            seq = (ctx + cont)[-(self.max_length + 1):]
            items.append((i, seq[:-1], min(len(cont), len(seq) - 1)))
        items.sort(key=lambda t: -len(t[1]))
        for start in range(0, len(items), self.batch_size):
            chunk = items[start:start + self.batch_size]
            width = max(len(inp) for _, inp, _ in chunk)
            batch = torch.full((len(chunk), width), self.pad_id, dtype=torch.long)
            for row, (_, inp, _) in enumerate(chunk):
                batch[row, :len(inp)] = torch.tensor(inp, dtype=torch.long)
            logits = call(self.model, batch).logits.float()
            logp = F.log_softmax(logits, dim=-1)
            for row, (i, inp, n_cont) in enumerate(chunk):
                full = pairs[i][0] + pairs[i][1]
                target = torch.tensor(full[-n_cont:], dtype=torch.long, device=logp.device)
                lp = logp[row, len(inp) - n_cont:len(inp)]
                score = float(lp.gather(-1, target.unsqueeze(-1)).sum())
                greedy = bool((lp.argmax(-1) == target).all())
                results[i] = (score, greedy)
        return results  # type: ignore[return-value]

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        pairs = [self._encode_pair(*req.args[:2]) for req in requests]
        out = self._score(pairs)
        for req, res in zip(requests, out):
            self.cache_hook.add_partial("loglikelihood", req.args, res)
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        out = []
        for req in requests:
            tokens = self.tok_encode(req.args[0])
            seq = [self.prefix_token_id] + tokens
            pairs = []
            for start in range(0, len(tokens), self.max_length):
                end = min(start + self.max_length, len(tokens))
                first = max(0, end - self.max_length)
                # input seq[first:end] predicts seq[first+1:end+1]; score the last end-start of them
                pairs.append((seq[first:start + 1], seq[start + 1:end + 1]))
            total = sum(score for score, _ in self._score(pairs))
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
            out.append(total)
        return out

    @torch.inference_mode()
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        out = []
        for req in requests:
            context, gen_kwargs = req.args[0], dict(req.args[1] if len(req.args) > 1 else {})
            until = gen_kwargs.pop("until", None) or []
            if isinstance(until, str):
                until = [until]
            max_new = int(gen_kwargs.pop("max_gen_toks", self.max_gen_toks))
            ids = self.tok_encode(context)
            if self.add_bos or not ids:
                ids = [self.prefix_token_id] + ids
            ids = ids[-(self.max_length - max_new):] if self.max_length > max_new else ids[-1:]
            inp = torch.tensor([ids], dtype=torch.long, device=self._device)
            gen = self.model.generate(input_ids=inp, attention_mask=torch.ones_like(inp), max_new_tokens=max_new,
                                      do_sample=False, pad_token_id=self.pad_id)
            text = self.tokenizer.decode(gen[0, inp.shape[1]:], skip_special_tokens=True)
            for stop in until:
                if stop and stop in text:
                    text = text.split(stop)[0]
            self.cache_hook.add_partial("generate_until", req.args, text)
            out.append(text)
        return out

    def close(self) -> None:
        """Remove the runtime parts (hooks, attention wrapper); the quantized weights stay, except on a model
        changed in place, which gets its original weights back."""
        self.state.remove()
        self.mitigation.remove()
        if self._journal is not None:
            self._journal.__exit__(None, None, None)
            self._journal = None


def register() -> None:
    """Register :class:`OutlierlabLM` as lm_eval model ``outlierlab`` (lm_eval's own models stay available)."""
    if not HAVE_LM_EVAL:
        raise OutlierlabError(INSTALL_HINT)
    import lm_eval.models  # noqa: F401 - load the built-in registry first (it is lazy while empty)
    from lm_eval.api.registry import get_model

    try:
        if get_model("outlierlab") is OutlierlabLM:
            return
    except (ValueError, KeyError):
        pass
    _register_model("outlierlab")(OutlierlabLM)
