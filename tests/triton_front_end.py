"""Triton's front end (Python AST -> TTIR) on the statistics kernels for an sm_90 target, without a GPU.

Run by tests/test_stats_triton.py in a process without ``TRITON_INTERPRET``. Prints each kernel's name once
it passes; a kernel the front end rejects raises its CompilationError; exits 3 when this Triton's internal
compiler API is not the one used here (the test then skips).
"""

import inspect
import sys

import triton.language as tl

try:
    from triton._C.libtriton import ir
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import CUDABackend
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction
except ImportError as e:
    print(f"Triton's front end is not reachable here: {e}")
    sys.exit(3)

from outlierlab.tracing import kernels, triton_src

TARGET = GPUTarget("cuda", 90, 32)
BACKEND = CUDABackend(TARGET)
OPTIONS = BACKEND.parse_options({"num_warps": 4})


def front_end(fn, types: dict, consts: dict) -> None:
    params = inspect.signature(fn).parameters
    consts = {k: v for k, v in consts.items() if k in params}
    sig = {n: "constexpr" if n in consts else types[n] for n in params}
    ctx = ir.context()
    ir.load_dialects(ctx)
    BACKEND.load_dialects(ctx)
    source = ASTSource(JITFunction(fn), sig, constexprs=consts)
    source.make_ir(TARGET, OPTIONS, BACKEND.get_codegen_implementation(OPTIONS), BACKEND.get_module_map(), ctx)
    print(fn.__name__, flush=True)


def main() -> None:
    g = kernels._geometry(4, 2048, 4096, 32)
    common = {"INDIRECT": True, "XDT": tl.bfloat16, "stride_r": 4096, "stride_c": 1, "B": 4, "S": 2048, "C": 4096,
              "n_rg": g["n_rg"]}
    types = {"x_ptr": "*bf16", "sum_ptr": "*fp64", "window0": "i64", "ticket_ptr": "*i32"}
    types.update({n: "*fp32" for n in ("max_ptr", "part_ptr", "tokmax_ptr", "rpart_ptr", "tok_val_ptr")})
    types.update({n: "*i64" for n in ("rows_idx_ptr", "elem_idx_ptr", "args_ptr", "tok_idx_ptr", "keys_ptr",
                                      "tokw_ptr", "tokkey_ptr", "list_ptr", "top_ptr", "count_ptr")})
    # every constant either kernel version takes; each kernel gets the ones in its signature
    stats = {**common, "KR": 16, "n_elem": 8192, "n_hist": 8, "n_cb": g["n_cb"], "lo": 2.0 ** -32,
             "hi": 2.0 ** 24 * 0.999, "log2_min": -32.0, "bins_per_octave": 32.0, "n_bins": 56 * 32, "BP": g["BP"],
             "TB": g["TB"], "R": g["R"], "BC": g["BC"], "CBF": g["CBF"], "KRP": 16, "BLOCK_M": 16, "NE": 1024,
             "KT": g["KT"], "KTP": g["KTP"], "SP": 2048, "FOLD_TOPK": True}
    cand = {**common, "KT": g["KT"], "use_floor": 1, "KTP": g["KTP"], "BLOCK_C": g["BLOCK_CB"], "TOP": g["TOP"],
            "RB": 32, "n_cand": g["n_cand"], "CAP": 1024}
    front_end(triton_src.stats_pass, types, stats)
    front_end(triton_src.candidates, types, cand)


if __name__ == "__main__":
    from triton.compiler.errors import CompilationError

    try:
        main()
    except CompilationError:
        raise  # a kernel the front end rejects: the test fails
    except Exception as e:  # noqa: BLE001 - any other error is this Triton's API, not the kernels
        print(f"Triton's front end API differs here: {type(e).__name__}: {e}")
        sys.exit(3)
