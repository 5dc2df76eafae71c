"""Triton's front end (Python AST -> TTIR) on the statistics kernels for an sm_90 target, without a GPU, and
the graphed kernels' load layouts against a direct launch's (TTGIR). ``--ptx``: compile both to PTX here
and count their global loads by width.

Run by tests/test_stats_triton.py in a process without ``TRITON_INTERPRET``. Prints each kernel's name once
it passes; a kernel the front end rejects raises its CompilationError; exits 3 when this Triton's internal
compiler API is not the one used here (the test then skips).
"""

import inspect
import re
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


def front_end(fn, types: dict, consts: dict, lower: bool = False, ptx: bool = False):
    """The kernel through the front end; with ``lower``, on to TTGIR (the layouts the GPU code will use), or
    with ``ptx`` on to PTX, its pointer arguments 16-byte aligned as Triton specializes them at a launch."""
    lower = lower or ptx
    params = inspect.signature(fn).parameters
    consts = {k: v for k, v in consts.items() if k in params}
    sig = {n: "constexpr" if n in consts else types[n] for n in params}
    ctx = ir.context()
    ir.load_dialects(ctx)
    BACKEND.load_dialects(ctx)
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(params) if n.endswith("_ptr")} if lower else None
    source = ASTSource(JITFunction(fn), sig, constexprs=consts, attrs=attrs)
    mod = source.make_ir(TARGET, OPTIONS, BACKEND.get_codegen_implementation(OPTIONS), BACKEND.get_module_map(),
                         ctx)
    if not lower:
        return None
    meta: dict = {}
    mod = BACKEND.make_ttgir(BACKEND.make_ttir(mod, meta, OPTIONS, TARGET.arch), meta, OPTIONS, TARGET.arch)
    if ptx:
        return BACKEND.make_ptx(BACKEND.make_llir(mod, meta, OPTIONS, TARGET.arch), meta, OPTIONS, TARGET.arch)
    return str(mod)


def global_loads(ptx: str) -> dict[str, int]:
    """Global loads in the PTX by width: 16-byte vectors, 8-byte vectors, and 2-byte scalars."""
    return {w: len(re.findall(rf"ld\.global(?:\.\w+)*\.{p}\s", ptx))
            for w, p in (("16 B", r"v4\.b32"), ("8 B", r"v2\.b32"), ("2 B", "b16"))}


def load_layouts(ttgir: str, dtype: str = "bf16") -> list[str]:
    """The layout of every load of a ``dtype`` tensor, in program order."""
    layouts = dict(re.findall(r"(#blocked\d*) = (#ttg\.blocked<\{[^}]*\}>)", ttgir))
    return [layouts[m] for line in ttgir.splitlines() if "tt.load" in line and f"tt.ptr<{dtype}>" in line
            for m in re.findall(r"#blocked\d*", line)[-1:]]


def main() -> None:
    g = kernels._geometry(4, 2048, 4096, 32)
    common = {"INDIRECT": True, "XDT": tl.bfloat16, "stride_r": 4096, "stride_c": 1, "B": 4, "S": 2048, "C": 4096,
              "n_rg": g["n_rg"]}
    types = {"x_ptr": "*bf16", "sum_ptr": "*fp64", "window0": "i64", "ticket_ptr": "*i32"}
    types.update({n: "*fp32" for n in ("max_ptr", "part_ptr", "tokmax_ptr", "rpart_ptr", "tok_val_ptr")})
    types["tok_ptr"] = "*i32"
    types.update({n: "*i64" for n in ("rows_idx_ptr", "elem_idx_ptr", "args_ptr", "tok_idx_ptr", "keys_ptr",
                                      "tokw_ptr", "tokkey_ptr", "list_ptr", "top_ptr", "count_ptr")})
    # every constant either kernel version takes; each kernel gets the ones in its signature
    stats = {**common, "KR": 16, "n_elem": 8192, "n_hist": 8, "n_cb": g["n_cb"], "lo": 2.0 ** -32,
             "hi": 2.0 ** 24 * 0.999, "log2_min": -32.0, "bins_per_octave": 32.0, "n_bins": 56 * 32, "BP": g["BP"],
             "TB": g["TB"], "R": g["R"], "BC": g["BC"], "CBF": g["CBF"], "KRP": 16, "BLOCK_M": 16, "NE": 1024,
             "KT": g["KT"], "KTP": g["KTP"], "SP": 2048, "FOLD_TOPK": True, "NS": g["NS"],
             "EVICT": g["evict"]}
    cand = {**common, "KT": g["KT"], "use_floor": 1, "KTP": g["KTP"], "BLOCK_C": g["BLOCK_CB"], "TOP": g["TOP"],
            "RB": 32, "n_cand": g["n_cand"], "CAP": 1024, "SP": 2048, "RING": 16, "TZ": 16}
    if "--ptx" in sys.argv:  # what a graphed and a direct launch load, compiled for sm_90 here
        for fn, consts in ((triton_src.stats_pass, stats), (triton_src.candidates, cand)):
            for indirect in (False, True):
                loads = global_loads(front_end(fn, types, {**consts, "INDIRECT": indirect}, ptx=True))
                print(f"{fn.__name__:11s} {'graphed' if indirect else 'direct ':8s} global loads {loads}")
        return
    front_end(triton_src.stats_pass, types, stats)
    print("stats_pass", flush=True)
    front_end(triton_src.candidates, types, cand)
    print("candidates", flush=True)
    front_end(triton_src.fetch, {"staging_ptr": "*i64", "slot_ptr": "*i64", "args_ptr": "*i64"}, {"ROWS": 4096},
              ptx=True)
    print("fetch", flush=True)
    # a graph replays the kernels with the tensor's address read from memory: they must still load as widely
    # as a direct launch, which Triton specializes on the (16-byte aligned) address it is given
    for fn, consts in ((triton_src.stats_pass, stats), (triton_src.candidates, cand)):
        direct = load_layouts(front_end(fn, types, {**consts, "INDIRECT": False}, lower=True))
        graphed = load_layouts(front_end(fn, types, {**consts, "INDIRECT": True}, lower=True))
        assert direct and graphed == direct, (fn.__name__, direct, graphed)
    print("layouts", flush=True)


if __name__ == "__main__":
    from triton.compiler.errors import CompilationError

    try:
        main()
    except (CompilationError, AssertionError):
        raise  # a kernel the front end rejects, or graphed loads narrower than direct ones: the test fails
    except Exception as e:  # noqa: BLE001 - any other error is this Triton's API, not the kernels
        print(f"Triton's front end API differs here: {type(e).__name__}: {e}")
        sys.exit(3)
