"""Evaluation throughput against a bare forward, and the fake-quantization overhead, in one run.

Prints two ratios measured over the same windows, modes interleaved and repeated (the median of each is used):

- ``eval / bare``: throughput of ``outlierlab.evaluation.perplexity`` (forward + loss) divided by the throughput
  of a bare ``model(input_ids)`` forward (logits computed, nothing else). Target: at least 0.95.
- ``w8a8-token / fp``: time of the perplexity evaluation with W8A8 per-token fake quantization installed,
  divided by the time without it. Target: at most 1.5 on a GPU.

Examples:
    python bench/eval_throughput.py                         # default model, 8 x 512 tokens, CPU
    python bench/eval_throughput.py --device cuda --dtype bfloat16
    python bench/eval_throughput.py --shape 7b --device cuda --dtype bfloat16 --n-samples 8 --seq-len 2048
    python bench/eval_throughput.py --tiny                  # a tiny random llama (smoke test)
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _bare(model, ids, batch_size, device) -> None:
    with torch.inference_mode():
        for start in range(0, len(ids), batch_size):
            model(input_ids=ids[start:start + batch_size].to(device), use_cache=False)


def _model(args):
    """(model, ids, description)."""
    from outlierlab.testing import tiny_model

    if args.tiny or args.shape:
        if args.tiny:
            model = tiny_model("llama")
            desc = "tiny random llama (d=64, 3 layers)"
        else:  # a 7B-shaped LLaMA with random weights (no download): same shapes, same cost per token
            from transformers import AutoModelForCausalLM, LlamaConfig

            cfg = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                              num_attention_heads=32, num_key_value_heads=32, vocab_size=32000,
                              max_position_embeddings=4096)
            with torch.device(args.device):
                model = AutoModelForCausalLM.from_config(cfg, dtype=getattr(torch, args.dtype))
            desc = "LLaMA-7B-shaped, random weights"
        model = model.to(device=args.device, dtype=getattr(torch, args.dtype)).eval()
        gen = torch.Generator().manual_seed(0)
        ids = torch.randint(3, model.config.vocab_size, (args.n_samples, args.seq_len), generator=gen)
        return model, ids, desc
    from outlierlab.evaluation import EvalConfig, eval_windows
    from outlierlab.models import load_model

    lm = load_model(args.model, args.device, args.dtype)
    windows = eval_windows(lm.tokenizer, EvalConfig(seq_len=args.seq_len, n_samples=args.n_samples))
    return lm.model, windows.input_ids, lm.info["id"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--tiny", action="store_true", help="a tiny random llama instead of --model")
    ap.add_argument("--shape", choices=["7b"], help="a random-weight model of this shape instead of --model")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--n-samples", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quant", default="w8a8-token")
    ap.add_argument("--json", action="store_true", help="print the result as JSON too")
    args = ap.parse_args()

    from outlierlab.evaluation import perplexity
    from outlierlab.quantization import prepare
    from outlierlab.quantization.quantizers import (
        _quant_dynamic_eager,
        compile_enabled,
        quant_dynamic,
    )

    device = torch.device(args.device)
    model, ids, desc = _model(args)
    batch = args.batch_size

    def run_bare():
        _bare(model, ids, batch, device)

    def run_eval():
        perplexity(model, ids, batch)

    # the quantized weights and quantizers are computed once (timed apart); each timed run installs them,
    # evaluates and removes them, so the ratio is the run-time cost of fake quantization
    _sync(device)
    t0 = time.perf_counter()
    plan = prepare(model, args.quant)
    _sync(device)
    t_prepare = time.perf_counter() - t0

    def run_quant():
        with plan.install(model):
            perplexity(model, ids, batch)

    modes = {"bare": run_bare, "eval": run_eval, "quant": run_quant}
    # warm-up (allocator, kernels, first-touch), not timed
    run_bare()
    run_quant()
    times: dict[str, list[float]] = {k: [] for k in modes}
    for _ in range(args.repeats):
        for name, fn in modes.items():
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    probe = torch.randn(4, 256, model.config.hidden_size, device=device, dtype=next(model.parameters()).dtype)
    fused = compile_enabled(device)
    diff = float((quant_dynamic(probe, 8, True, -1) - _quant_dynamic_eager(probe, 8, True, (-1,), 1.0))
                 .float().abs().max()) if fused else 0.0
    tokens = ids.numel()
    eval_ratio = med["bare"] / med["eval"]  # throughput ratio = inverse time ratio
    quant_ratio = med["quant"] / med["eval"]
    machine = (torch.cuda.get_device_name(device) if device.type == "cuda"
               else f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads")
    print(f"model: {desc}; {args.n_samples} x {args.seq_len} tokens, batch {batch}, {args.dtype} on {machine}")
    print(f"bare forward      {med['bare']:8.3f} s  ({tokens / med['bare']:,.0f} tok/s)")
    print(f"evaluation (ppl)  {med['eval']:8.3f} s  ({tokens / med['eval']:,.0f} tok/s)")
    print(f"{args.quant + ' ppl':17s} {med['quant']:8.3f} s  ({tokens / med['quant']:,.0f} tok/s); weights "
          f"quantized once in {t_prepare:.2f} s; fused (torch.compile) quantizer: {fused}"
          + (f" (max |fused - eager| = {diff:.3g})" if fused else ""))
    print(f"eval throughput / bare forward throughput = {eval_ratio:.3f}   (target >= 0.95)")
    print(f"fake-quant overhead ({args.quant}) = {quant_ratio:.3f}x   (target <= 1.5 on GPU)")
    best = {k: min(v) for k, v in times.items()}
    print(f"(fastest runs instead of medians, less sensitive to other load on the machine: "
          f"{best['bare'] / best['eval']:.3f} and {best['quant'] / best['eval']:.3f}x)")
    if args.json:
        print(json.dumps({"model": desc, "device": machine, "dtype": args.dtype, "tokens": tokens,
                          "times_s": times, "eval_over_bare": eval_ratio, "quant_overhead": quant_ratio,
                          "prepare_s": t_prepare, "fused_quantizer": fused}))


if __name__ == "__main__":
    main()
