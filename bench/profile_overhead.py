"""Tracing overhead: (profile time) / (bare forward time) on the same windows, measured in one run.

    python bench/profile_overhead.py                       # default model, CPU, 8 windows x 512
    python bench/profile_overhead.py --device cuda --model PATH_OR_ALIAS --dtype bfloat16
    python bench/profile_overhead.py --synthetic 7b --device cuda   # random 7B-shaped LLaMA, no download

Both passes run the same windows in the same batches, interleaved for ``--repeats`` rounds after a warm-up;
the ratio of the medians is printed. Profile time includes the hooks, the statistics and their final copy
to the host, i.e. everything :func:`outlierlab.profile` adds to the forward passes. The bare forward is the
forward a profile runs: the output layer on the last position only (``run(..., logits=False)``); the ratio
against the model's full forward (every position's logits: 28% of a SmolLM2 forward on 2 CPU cores, 2% at the
7B shape) is printed too. Until 2026-12-03 the profile computed all logits and was compared with the full one.
``--breakdown`` adds the phases of one profile and its host time by function.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch


def synthetic_model(shape: str, device: str, dtype: torch.dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    shapes = {
        "7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                   num_key_value_heads=32),
        "1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                   num_key_value_heads=4),
        "tiny": dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
                     num_key_value_heads=4),
    }
    cfg = LlamaConfig(vocab_size=32000, max_position_embeddings=4096, **shapes[shape])
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(dtype)
    return model.eval(), {"id": f"synthetic-llama-{shape}", "model_type": "llama"}


def synthetic_setup(ap: argparse.ArgumentParser, batch_sizes: str, repeats: int):
    """The options every bench of a synthetic model takes (shape, device, dtype, tokens per window, batch
    sizes, repeats; a caller adds its own to ``ap`` first), parsed, and the model built on the device: returns
    (args, model, info, device, sync), ``sync`` waiting for the device (nothing on a CPU)."""
    ap.add_argument("--synthetic", choices=["7b", "1b", "tiny"], default="7b")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--batch-sizes", default=batch_sizes)
    ap.add_argument("--repeats", type=int, default=repeats)
    args = ap.parse_args()

    from outlierlab.models.loader import resolve_device, resolve_dtype

    device, dtype = resolve_device(args.device), resolve_dtype(args.dtype)
    model, info = synthetic_model(args.synthetic, str(device), dtype)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    return args, model, info, device, sync


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--synthetic", choices=["7b", "1b", "tiny"], default=None)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--n-samples", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--compile", choices=["auto", "triton", "graphs", "fused", "never"], default="auto",
                    help="how the statistics update runs (StatsConfig.compile; auto: Triton on CUDA)")
    ap.add_argument("--no-overlap", action="store_true",
                    help="graphed statistics on the model's stream (StatsConfig.overlap=False)")
    ap.add_argument("--overlap-min-forwards", type=int, default=None,
                    help="the fewest forwards of a profile that the overlap watches (Overlap.MIN_FORWARDS)")
    ap.add_argument("--tune", default=None,
                    help="a JSON dict of kernels.TUNE keys for the whole run (e.g. '{\"group\": 1024, \"bc\": 512}': fewer, "
                         "longer stats_pass programs, which leave more SMs to the model's kernels beside them)")
    ap.add_argument("--model-stream-priority", type=int, default=None,
                    help="run every pass (bare, full, profile) on a new CUDA stream of this priority (e.g. -1: "
                         "above the statistics' side stream, which has the default priority 0)")
    ap.add_argument("--breakdown", action="store_true",
                    help="then one more profile per batch size: its phases (trace, finalize, detect) and the "
                         "functions with the most host time (cProfile)")
    ap.add_argument("--batch-sizes", default=None,
                    help="comma-separated batch sizes measured one after the other on the same model "
                         "(overrides --batch-size)")
    ap.add_argument("--drop-positions", default="",
                    help="comma-separated positions left untraced (ProfileConfig.positions: the others): what "
                         "tracing them costs, e.g. mlp.act,mlp.down_in, the two a pass computing them from the "
                         "gate and up tensors would no longer read")
    args = ap.parse_args()

    from outlierlab.models.loader import load_model, resolve_device, resolve_dtype
    from outlierlab.runtime import run
    from outlierlab.tracing import ProfileConfig, StatsConfig, profile

    device, dtype = resolve_device(args.device), resolve_dtype(args.dtype)
    if args.synthetic:
        model, info = synthetic_model(args.synthetic, str(device), dtype)
        gen = torch.Generator().manual_seed(0)
        ids = torch.randint(0, model.config.vocab_size, (args.n_samples, args.seq_len), generator=gen)
    else:
        from outlierlab.data import DataConfig, make_windows

        lm = load_model(args.model, str(device), args.dtype)
        model, info = lm.model, lm.info
        ids = make_windows(lm.tokenizer, DataConfig(seq_len=args.seq_len, n_samples=args.n_samples)).input_ids

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    gc_clock = GcClock()
    gc_runs: list[float] = []  # the garbage collector's time in each timed run, in run order

    def timed(fn) -> tuple[float, float]:
        """(seconds, peak GPU memory in GiB above what was allocated before; 0 on a CPU)."""
        sync()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
        gc_clock.reset()
        t = time.perf_counter()
        fn()
        sync()
        elapsed = time.perf_counter() - t
        gc_runs.append(gc_clock.seconds)
        peak = (torch.cuda.max_memory_allocated(device) - base) / 2**30 if device.type == "cuda" else 0.0
        return elapsed, peak

    where = torch.cuda.get_device_name(device) if device.type == "cuda" else (
        f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads")
    print(f"model {info['id']} | {args.n_samples} windows x {args.seq_len} tokens, {args.dtype} | device {device} "
          f"({where}) | torch {torch.__version__} | compile {args.compile}"
          f"{' | no overlap' if args.no_overlap else ''}")
    if args.tune:
        import json

        from outlierlab.tracing import kernels

        kernels.TUNE.update(json.loads(args.tune))
        print(f"kernels.TUNE = {kernels.TUNE}")
    if args.overlap_min_forwards is not None:
        from outlierlab.tracing.overlap import Overlap

        Overlap.MIN_FORWARDS = args.overlap_min_forwards
    sizes = [int(b) for b in args.batch_sizes.split(",")] if args.batch_sizes else [args.batch_size]
    positions = None  # every position
    if args.drop_positions:
        from outlierlab.adapters import get_adapter

        names = [p.name for p in get_adapter(model).positions()]
        dropped = set(args.drop_positions.split(","))
        if dropped - set(names):
            raise SystemExit(f"no such positions: {sorted(dropped - set(names))}; the model's: {names}")
        positions = tuple(n for n in names if n not in dropped)
        print(f"positions traced: {len(positions)} of {len(names)} (left out: {args.drop_positions})")
    if args.model_stream_priority is not None:
        stream = torch.cuda.Stream(device, priority=args.model_stream_priority)
        torch.cuda.set_stream(stream)
        print(f"every pass on a CUDA stream of priority {stream.priority}")
    for batch in sizes:
        config = ProfileConfig(stats=StatsConfig(compile=args.compile, overlap=not args.no_overlap),
                               batch_size=batch, weights=False, positions=positions)

        def bare(batch=batch):
            return timed(lambda: run(model, ids, batch, logits=False))  # the forward a profile runs

        def full(batch=batch):
            return timed(lambda: run(model, ids, batch))  # the model's own forward: logits at every position

        phases: list[dict] = []  # each timed profile's own timings (trace_s: device time to the last forward's
        # end; finalize_s: the host time after it)

        def traced(config=config, phases=phases):
            return timed(lambda: phases.append(profile(model, ids, config).timings))

        bare(), full(), traced()  # warm-up (allocator, kernels, sample-index cache)
        t_bare, t_full, t_prof = [], [], []
        for _ in range(args.repeats):
            t_bare.append(bare())
            t_full.append(full())
            t_prof.append(traced())
        mb = statistics.median(t for t, _ in t_bare)
        mf = statistics.median(t for t, _ in t_full)
        mp = statistics.median(t for t, _ in t_prof)
        print(f"batch {batch}: bare forward median {mb:8.3f} s  runs {[round(t, 3) for t, _ in t_bare]}")
        print(f"batch {batch}: full forward median {mf:8.3f} s  runs {[round(t, 3) for t, _ in t_full]}")
        print(f"batch {batch}: profile      median {mp:8.3f} s  runs {[round(t, 3) for t, _ in t_prof]}")
        print(f"batch {batch}: profile phases (median of the timed runs, [min-max]): " + ", ".join(
            f"{k} {statistics.median(p[k] for p in phases[1:]) * 1e3:.1f} ms "
            f"[{min(p[k] for p in phases[1:]) * 1e3:.1f}-{max(p[k] for p in phases[1:]) * 1e3:.1f}]"
            for k in phases[0]))
        print(f"batch {batch}: Python's garbage collector in the timed runs (bare, full, profile per repeat): "
              f"{' '.join(f'{g * 1e3:.0f}' for g in gc_runs[-3 * args.repeats:])} ms")
        print(f"batch {batch}: overhead ratio (profile / bare) = {mp / mb:.3f}; against the full forward "
              f"(every position's logits) {mp / mf:.3f}")
        if device.type == "cuda":
            mem_b, mem_p = max(m for _, m in t_bare), max(m for _, m in t_prof)
            print(f"batch {batch}: peak GPU memory above the model: bare {mem_b:.3f} GiB, profile {mem_p:.3f} GiB "
                  f"(tracing adds {mem_p - mem_b:+.3f} GiB for {args.n_samples} x {args.seq_len} tokens)")
        if args.breakdown:
            breakdown(lambda config=config: profile(model, ids, config), sync, batch)


class GcClock:
    """Seconds Python's cyclic garbage collector ran since :meth:`reset` (a collection of the oldest generation
    walks every object of the process: a candidate for a timed run that is slower than its repeats)."""

    def __init__(self) -> None:
        import gc

        self.seconds, self._start = 0.0, 0.0
        gc.callbacks.append(self._callback)

    def reset(self) -> None:
        self.seconds = 0.0

    def _callback(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._start = time.perf_counter()
        else:
            self.seconds += time.perf_counter() - self._start


def breakdown(fn, sync, batch: int, top: int = 25) -> None:
    """Phases of one profile (its own timings) and the functions with the most host time in another one."""
    import cProfile
    import pstats

    sync()
    t = time.perf_counter()
    prof = fn()
    sync()
    total = time.perf_counter() - t
    phases = ", ".join(f"{k} {v:.3f} s" for k, v in prof.timings.items())
    print(f"batch {batch}: one profile {total:.3f} s: {phases}")
    pr = cProfile.Profile()
    sync()
    pr.enable()
    fn()
    sync()
    pr.disable()
    print(f"batch {batch}: host time by function (cProfile, tottime; cProfile slows Python-heavy code):")
    pstats.Stats(pr).sort_stats("tottime").print_stats(top)
    print(f"batch {batch}: the same by cumulative time:")
    pstats.Stats(pr).sort_stats("cumulative").print_stats(top)


if __name__ == "__main__":
    main()
