"""What compiling the Triton statistics kernels costs, per tensor shape, measured on this machine's CPU.

    python bench/compile_time.py                               # the default model's widths, 2 x 128 tokens
    python bench/compile_time.py --shapes 4x2048x4096,4x2048x11008 --dtype bfloat16      # a 7B profile
    python bench/compile_time.py --threads 6          # then all six at once: Triton's stages release the GIL

A first GPU profile on a machine compiles every (kernel, shape) it meets once; Triton keeps the binaries in its
cache (``~/.triton/cache``) for the next process. That is host work, so it is measured here without a GPU: the
launches ``kernels._issue`` makes for a graphed update (the CUDA default) of each BxSxC shape are recorded
instead of run, and each kernel is compiled for an sm_90 target through Triton's stages, each timed: the front
end (Python -> TTIR), TTGIR, LLVM IR, PTX, and ptxas (cubin). Needs Triton's compiler API of 3.x (exits with a
message where it differs).
"""

from __future__ import annotations

import argparse
import time

import torch

from outlierlab.tracing import kernels
from outlierlab.tracing.stats import StatsConfig

_TYPES = {torch.float32: "fp32", torch.float64: "fp64", torch.bfloat16: "bf16", torch.float16: "fp16",
          torch.int32: "i32", torch.int64: "i64"}


class _Recorder:
    """Stands in for a Triton kernel: ``kernel[grid](*args, **kwargs)`` records the launch instead of running it."""

    def __init__(self, fn):
        self.fn, self.launches = fn, []

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launches.append((args, kwargs))


def recorded_launches(batch: int, seq_len: int, channels: int, dtype: torch.dtype) -> list:
    """(python function, positional args, keyword args) of each kernel launch of one graphed update."""
    from outlierlab.tracing import triton_src

    recs = [_Recorder(triton_src.stats_pass), _Recorder(triton_src.candidates)]
    real = kernels._kernels
    kernels._kernels = lambda: (*recs, None)
    try:
        c = StatsConfig()
        x = torch.zeros(batch * seq_len, channels, dtype=dtype)
        bufs = kernels._buffers(batch, seq_len, channels, c.top_k, x.device, fresh=False)
        rows_idx = torch.zeros(c.channel_median_rows, dtype=torch.int64)
        elem_idx = torch.zeros(min(c.median_samples, x.numel()), dtype=torch.int64)
        args = torch.zeros(8, dtype=torch.int64)
        kernels._issue(x, batch, seq_len, 0, torch.zeros(channels), torch.zeros(channels, dtype=torch.float64),
                       rows_idx, elem_idx, c.top_k, c.log2_min, c.log2_max, c.bins_per_octave, bufs, args=args,
                       ring=c.merge_every)
    finally:
        kernels._kernels = real
    return [(r.fn, *launch) for r in recs for launch in r.launches]


def compile_stages(fn, args: tuple, kwargs: dict) -> dict[str, float]:
    """Seconds per compiler stage of ``fn`` launched with ``args``/``kwargs``, for sm_90."""
    import inspect

    from triton._C.libtriton import ir
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import CUDABackend
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction

    target = GPUTarget("cuda", 90, 32)
    backend = CUDABackend(target)
    opts = backend.parse_options({"num_warps": kwargs.get("num_warps", 4)})
    params = list(inspect.signature(fn).parameters)
    bound = dict(zip(params, args)) | {k: v for k, v in kwargs.items() if k in params}
    consts = {k: v for k, v in bound.items() if not isinstance(v, torch.Tensor) and k != "window0"}
    sig = {n: "constexpr" if n in consts else
           f"*{_TYPES[bound[n].dtype]}" if isinstance(bound[n], torch.Tensor) else "i64" for n in params}
    # pointers 16-byte aligned, as Triton specializes them at a launch on an aligned allocation
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(params) if sig[n].startswith("*")}
    ctx = ir.context()
    ir.load_dialects(ctx)
    backend.load_dialects(ctx)
    times, meta = {}, {}
    t = time.perf_counter()
    mod = ASTSource(JITFunction(fn), sig, constexprs=consts, attrs=attrs).make_ir(
        target, opts, backend.get_codegen_implementation(opts), backend.get_module_map(), ctx)
    times["front end"] = time.perf_counter() - t
    for name, step in (("ttir", backend.make_ttir), ("ttgir", backend.make_ttgir), ("llir", backend.make_llir),
                       ("ptx", backend.make_ptx), ("ptxas", backend.make_cubin)):
        t = time.perf_counter()
        mod = step(mod, meta, opts, target.arch)
        times[name] = time.perf_counter() - t
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="2x128x576,2x128x192,2x128x1536",
                    help="BxSxC: windows per forward, tokens per window, channels (default: SmolLM2-135M's "
                         "hidden, k/v and FFN widths at 2 x 128 tokens)")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--threads", type=int, default=0,
                    help="then compile every kernel again, this many at once on a thread pool: the wall time")
    args = ap.parse_args()
    import triton

    dtype = getattr(torch, args.dtype)
    print(f"triton {triton.__version__} | sm_90 target, compiled on this CPU | {args.dtype}")
    total = 0.0
    launches = []
    for shape in args.shapes.split(","):
        b, s, c = (int(v) for v in shape.split("x"))
        for fn, a, kw in recorded_launches(b, s, c, dtype):
            launches.append((fn, a, kw))
            try:
                times = compile_stages(fn, a, kw)
            except (ImportError, AttributeError, TypeError) as e:
                raise SystemExit(f"Triton's compiler API differs here: {type(e).__name__}: {e}") from e
            spent = sum(times.values())
            total += spent
            print(f"{shape:>14s} {fn.__name__:11s} {spent:6.2f} s  (" +
                  ", ".join(f"{k} {v:.2f}" for k, v in times.items()) + ")")
    print(f"all, one after the other: {total:.2f} s")
    if args.threads:
        from concurrent.futures import ThreadPoolExecutor

        t = time.perf_counter()
        with ThreadPoolExecutor(args.threads) as pool:
            list(pool.map(lambda launch: compile_stages(*launch), launches))
        print(f"all, {args.threads} at once on threads: {time.perf_counter() - t:.2f} s")


if __name__ == "__main__":
    main()
