"""How far a rounding-level perturbation of the weights moves a fake-quantized perplexity: the model's weights
are multiplied by (1 + eps * N(0, 1)) for eps of the order of float32's epsilon, then mitigated and evaluated
under w8a8-tensor (the protocol of outlierlab compare). A cell whose perplexity moves by x% here cannot be
expected to agree across devices (whose kernels round differently) better than that.

    python bench/quant_sensitivity.py
"""

import copy

import torch

from outlierlab.data import DataConfig, make_windows
from outlierlab.evaluation import EvalConfig, eval_windows, perplexity
from outlierlab.mitigation import mitigate
from outlierlab.models import load_model
from outlierlab.quantization import quantize_

lm = load_model()
calib = make_windows(lm.tokenizer, DataConfig(), max_positions=8192)
ev = eval_windows(lm.tokenizer, EvalConfig())
for method in ["tma", "none"]:
  for eps in [0.0, 1e-7, 1e-6]:
    m = copy.deepcopy(lm.model)
    if eps:
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for p in m.parameters(): p.mul_(1 + eps * torch.randn(p.shape, generator=g))
    r = mitigate(m, [method], calib, lm.tokenizer)
    with quantize_(m, "w8a8-tensor", calib):
        print(method, eps, round(perplexity(m, ev), 3), flush=True)
    r.remove()
