"""The Triton statistics kernels (tracing/kernels.py) compute what the CPU path computes.

On a CPU machine they run under Triton's interpreter (conftest sets TRITON_INTERPRET=1 before triton is
imported); the CUDA lane compiles them for the GPU. Shapes are small: the interpreter is slow.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from outlierlab.tracing import kernels
from outlierlab.tracing.stats import PositionStats, StatsConfig

pytestmark = pytest.mark.skipif(not kernels.available(), reason="triton is not installed")


def _planted(batch_windows: int, seq_len: int, channels: int, dtype, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch_windows, seq_len, channels, generator=gen)
    x[1, 0, 5] = 900.0  # massive, window 1
    x[3 % batch_windows, 0, 5] = -950.0  # the same key in another window, larger (when there is one)
    x[0, 3, 11] = 300.0
    x[:, 2, 7] = 120.0  # the same value in every window: ties across windows
    x[:, :, 3] *= 40.0  # a channel-wise outlier
    return x.to(dtype)


@pytest.fixture
def device(request) -> str:
    """cpu (Triton's interpreter) here; cuda in the lane (`--device cuda`): the compiled kernels."""
    return request.config.getoption("--device")


def _run(mode: str, x: torch.Tensor, batch: int, **cfg) -> dict:
    st = PositionStats(StatsConfig(compile=mode, merge_every=2, **cfg))
    for b in range(0, len(x), batch):
        st.update(x[b:b + batch], b)
    return st.finalize()


def _assert_same(a: dict, b: dict) -> None:
    for key, want in a.items():
        got = b[key]
        if isinstance(want, torch.Tensor):
            # sums are accumulated in another order (per-program partials): float32 rounding, nothing more
            torch.testing.assert_close(got.cpu().to(want.dtype), want, rtol=1e-5, atol=1e-6, msg=key)
        else:
            assert got == pytest.approx(want, rel=1e-6), key


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("batch", "seq_len", "channels", "top_k"),
                         [(2, 24, 40, 8),    # KT = top_k tokens: candidates above the token floor
                          (3, 12, 20, 16),   # fewer tokens than top_k: no floor, the one-max-at-a-time path
                          (1, 33, 130, 4),   # batch 1, odd sizes
                          (2, 300, 520, 8)])  # 3 row groups x 3 blocks of channels: the tickets fold
def test_triton_equals_cpu_path(device, dtype, batch, seq_len, channels, top_k):
    x = _planted(6, seq_len, channels, dtype)
    _assert_same(_run("never", x, batch, top_k=top_k), _run("triton", x.to(device), batch, top_k=top_k))


@pytest.mark.parametrize("tune", [{"group": 512}, {"group": 512, "stages": 1}, {"group": 1024, "stages": 3},
                                  {"stages": 4, "r": 8}, {"group": 1024, "bc": 512}])
def test_row_group_geometries_equal_the_cpu_path(device, monkeypatch, tune):
    """Row groups of 512 rows (two per window pair here, the second one partial) or of 1024 (one, partial),
    with and without the pipelined loop, and shorter steps: the same statistics."""
    monkeypatch.setattr(kernels, "TUNE", tune)
    kernels._geometry.cache_clear()
    try:
        x = _planted(6, 300, 520, torch.bfloat16)
        _assert_same(_run("never", x, 2, top_k=8), _run("triton", x.to(device), 2, top_k=8))
    finally:
        kernels._geometry.cache_clear()


@pytest.mark.parametrize("batch, channels, rows, tiles", [
    (4, 11008, 1024, 344),  # 8 groups of 1024 rows x 43 blocks of 256 channels
    (16, 4096, 1024, 512),
    (4, 4096, 512, 256),    # 1024-row groups would make 128 tiles
    (1, 4096, 256, 128),    # none leaves 256 tiles: the shortest group
])
def test_row_groups_are_the_longest_that_fill_the_gpu(batch, channels, rows, tiles):
    g = kernels._geometry(batch, 2048, channels, 32)
    assert (g["BP"] * g["TB"], g["n_rg"] * g["n_cb"]) == (rows, tiles)


@pytest.mark.parametrize("cap", [1024, 64, 32])
def test_long_candidate_lists_are_ranked_on_the_device(device, monkeypatch, cap):
    """Fewer tokens than top_k (no floor) over 3 blocks of channels: every block appends its best 16 keys, and
    the last program ranks the 48 of them by one sort of 128 slots (cap 1024), or by 16 passes that load 64 keys
    (the cap 64 < 128 slots) or 32 at a time."""
    monkeypatch.setattr(kernels, "KEY_CAP", cap)
    x = _planted(6, 12, 300, torch.float32)
    _assert_same(_run("never", x, 3, top_k=16), _run("triton", x.to(device), 3, top_k=16))


def test_a_few_keys_above_the_floor_take_the_short_sort(device):
    """Gaussian activations over 4 blocks of 256 channels: the keys above the token floor number between TOP and
    2 TOP (computed here as the kernel counts them; the usual case at real shapes), ranked with a sort of 2 TOP."""
    x = torch.randn(2, 24, 1024, generator=torch.Generator().manual_seed(7))
    top = kernels._geometry(2, 24, 1024, 8)["TOP"]
    assert top < kernels.list_length(x, 8) <= 2 * top
    _assert_same(_run("never", x, 2, top_k=8), _run("triton", x.to(device), 2, top_k=8))


def test_strided_input_and_planted_top_entries(device):
    """A slice of a wider tensor (as q of a fused qkv output) is read in place, and the planted entries are the
    top entries with their signed values, windows, tokens and channels."""
    wide = _planted(4, 16, 96, torch.float32)
    x = wide[..., 32:64]  # channels 32..63 of the wide tensor
    x[2, 9, 4] = -500.0
    assert not x.is_contiguous()
    a, b = _run("never", x.contiguous(), 2, top_k=4), _run("triton", wide.to(device)[..., 32:64], 2, top_k=4)
    _assert_same(a, b)
    assert b["top_value"][0].item() == -500.0
    assert (b["top_window"][0].item(), b["top_token"][0].item(), b["top_channel"][0].item()) == (2, 9, 4)


def test_tied_token_maxima_take_the_first_tokens(device):
    """The candidates pick the top_k tokens by bisection on the token maxima: with every |x| equal but two
    planted tokens, the tokens tied at the threshold are taken in token order, and the result is the CPU
    path's to the last entry (equal |x| ranked by (token, channel))."""
    gen = torch.Generator().manual_seed(3)
    x = torch.where(torch.rand(4, 40, 24, generator=gen) < 0.5, -1.0, 1.0)
    x[1, 17, 9] = 3.0
    x[0, 5, 2] = -2.0
    a, b = _run("never", x, 2, top_k=8), _run("triton", x.to(device), 2, top_k=8)
    _assert_same(a, b)
    assert b["top_token"][:2].tolist() == [17, 5]
    # the six ties: the first tokens' first channels, the smallest window of each
    assert b["top_token"][2:].tolist() == [0] * 6 and b["top_channel"][2:].tolist() == list(range(6))
    assert b["top_window"][2:].tolist() == [0] * 6


def test_positions_merged_together_equal_positions_merged_alone(device):
    """merge_pending (what the tracer runs when the positions' candidates are due) gives every position the
    top-k it gets merging its own candidates, for positions of two shapes and several merges."""
    from outlierlab.tracing.stats import merge_pending

    mode = "graphs" if device == "cuda" else "triton"
    xs = [_planted(6, 16, 24 + 16 * (i % 2), torch.float32, seed=i) for i in range(4)]

    def fed(merge_every: int, together: bool) -> list[dict]:
        stats = [PositionStats(StatsConfig(compile=mode, top_k=4, merge_every=merge_every)) for _ in xs]
        for b in range(0, 6, 2):
            if together and stats[0].due():
                merge_pending(stats)
                assert not any(st.due() for st in stats)
            for st, x in zip(stats, xs):
                st.update(x[b:b + 2].to(device), b)
        return [st.finalize() for st in stats]

    for a, b, c in zip(fed(100, False), fed(1, True), fed(1, False)):
        _assert_same(a, b)
        _assert_same(a, c)


def test_shapes_the_keys_cannot_hold_take_another_path():
    assert kernels.fits(256, 2048, 11008, 32)
    assert not kernels.fits(257, 16, 8, 4)  # the window index has 8 bits
    assert not kernels.fits(1, 2048, 1 << 20, 32)  # 32 token slots x 2^20 channels > 22 bits


def test_finalizing_many_device_positions_together_equals_one_at_a_time(device):
    """finalize_all computes the results of many positions where their states live, positions of one shape
    together, and moves only the results (one copy per dtype): each position gets what finalizing it alone
    gives, and its result tensors share no storage with its state (from a GPU: pinned host memory)."""
    from outlierlab.tracing.stats import finalize_all

    xs = [_planted(4, 16, 24 + 8 * (i % 2), torch.float32, seed=i) for i in range(3)]

    def fed():
        out = []
        for x in xs:
            st = PositionStats(StatsConfig(compile="triton", top_k=4, merge_every=100))
            st.update(x[:2].to(device), 0)
            st.update(x[2:].to(device), 2)
            out.append(st)
        return out

    alone = [st.finalize() for st in fed()]
    stats = fed()
    assert all(st._pending_keys for st in stats)  # candidates still pending when finalized
    together = finalize_all(stats)
    states = {st.max_state.untyped_storage().data_ptr() for st in stats}
    for a, b in zip(alone, together):
        _assert_same(a, b)
        assert all(t.device.type == "cpu" and t.untyped_storage().data_ptr() not in states
                   for t in b.values() if isinstance(t, torch.Tensor))
        # from a GPU the results land in pinned host blocks (one copy, no move out of a stage)
        assert all(t.is_pinned() == (device == "cuda") for t in b.values() if isinstance(t, torch.Tensor))


def test_indirect_launch_reads_the_addresses_from_its_argument_buffer(device):
    """What a CUDA graph replays: a first kernel copies the update's row of host staging rows (the tensor's,
    the states' and the rings' addresses, the window offset) to a device buffer, the kernels read them there,
    and the update's keys and token slots are appended to the position's rings; the result equals the direct
    launch's."""
    from outlierlab.tracing import kernels as K

    x = _planted(4, 16, 40, torch.bfloat16).to(device)
    cfg = StatsConfig(top_k=4)
    consts = (cfg.top_k, cfg.log2_min, cfg.log2_max, cfg.bins_per_octave)
    rows, channels = 2 * 16, 40
    rows_idx = torch.arange(0, rows, 2, device=device)
    elem_idx = torch.arange(0, rows * channels, 7, device=device)
    n_bins = cfg.n_bins

    def state():
        return (torch.zeros(channels + 16, device=device),
                torch.zeros(2 * channels + 16 + n_bins, device=device, dtype=torch.float64))

    direct = state()
    for w in (0, 2):
        xb = x[w:w + 2].reshape(rows, channels)
        keys_d, tokw_d = K.update(xb, 2, 16, w, *direct, rows_idx, elem_idx, *consts)
    bufs = K._buffers(2, 16, channels, cfg.top_k, torch.device(device), fresh=False)
    ring = K.new_ring(4, 16, cfg.top_k, torch.device(device))
    indirect = state()
    _, _, fetch = K._kernels()
    staging = torch.zeros(3, 8, dtype=torch.int64, pin_memory=device == "cuda")  # 3 rows: the second lap's
    slot = torch.full((1,), 5, dtype=torch.int64, device=device)  # row is row 5 % 3 = 2, then row 0
    args = torch.zeros(8, dtype=torch.int64, device=device)
    like = torch.zeros(rows, channels, dtype=x.dtype, device=device)
    for row, w in ((2, 0), (0, 2)):
        xb = x[w:w + 2].reshape(rows, channels)
        staging[row] = torch.tensor([xb.data_ptr(), w, indirect[0].data_ptr(), indirect[1].data_ptr(),
                                     ring[0].data_ptr(), ring[1].data_ptr(), ring[2].data_ptr(), 0])
        fetch[(1,)](staging, slot, args, ROWS=3)
        K._issue(like, 2, 16, 0, like, like, rows_idx, elem_idx, *consts, bufs, args=args, ring=4)
    torch.testing.assert_close(indirect[0], direct[0])
    torch.testing.assert_close(indirect[1], direct[1], rtol=1e-6, atol=1e-6)
    assert int(slot) == 7 and int(ring[2]) == 2  # two rows fetched, two appended to the rings
    assert sorted(ring[0][1].tolist()) == sorted(keys_d.tolist())
    assert ring[1][1].tolist() == tokw_d.tolist()


def test_cuda_graph_path_equals_cpu_path(device):
    if device == "cpu":
        pytest.skip("CUDA graphs: the lane (--device cuda) runs this")
    x = _planted(6, 24, 40, torch.bfloat16)
    for batch in (2, 4):  # 4: a last, smaller batch takes a second captured layout
        a = _run("never", x, batch, top_k=8)
        b = _run("graphs", x.to(device), batch, top_k=8)
        _assert_same(a, b)
    # a tensor at an address the graph's loads may not assume (a view one element in) launches directly, also
    # between graphed updates of the same position
    buf = torch.empty(x.numel() + 1, dtype=x.dtype, device=device)
    odd = buf[1:].view(x.shape)
    odd.copy_(x)
    assert odd.data_ptr() % kernels.ALIGN != 0 and x.to(device).data_ptr() % kernels.ALIGN == 0
    st = PositionStats(StatsConfig(compile="graphs", merge_every=2, top_k=8))
    for b, part in ((0, odd[0:2]), (2, x.to(device)[2:4]), (4, odd[4:6])):
        st.update(part, b)
    _assert_same(_run("never", x, 2, top_k=8), st.finalize())
    # after a graphed update the same layout replays without the checks (the fast path); the same shape with
    # other strides (a slice of a wider tensor) takes the checked path and its own graph
    wide = torch.zeros(6, 24, 80, dtype=x.dtype, device=device)
    wide[..., :40] = x.to(device)
    st = PositionStats(StatsConfig(compile="graphs", merge_every=2, top_k=8))
    for b, part in ((0, x.to(device)[0:2]), (2, wide[2:4, :, :40]), (4, x.to(device)[4:6]), (0, x.to(device)[0:2])):
        st.update(part, b)
        assert st._fast is not None and st._fast.stride == part.stride()
    ref = PositionStats(StatsConfig(compile="never", merge_every=2, top_k=8))
    for b in (0, 2, 4, 0):
        ref.update(x[b:b + 2], b)
    _assert_same(ref.finalize(), st.finalize())
    # the rings' rows after a partial read: a finalize after 2 of 3 graphed updates, then 5 more (the rows of the
    # next merges wrap around the ring's end)
    ref = PositionStats(StatsConfig(compile="never", merge_every=3, top_k=8))
    st = PositionStats(StatsConfig(compile="graphs", merge_every=3, top_k=8))
    for i, b in enumerate([0, 2, 4, 0, 2, 4, 0]):
        ref.update(x[b:b + 2], b)
        st.update(x.to(device)[b:b + 2], b)
        if i == 1:
            _assert_same(ref.finalize(), st.finalize())
    _assert_same(ref.finalize(), st.finalize())


DEVICE_TRITON = Path(sys.prefix) / "triton-device"  # the GPU image's Triton, installed beside by `make setup`


@pytest.mark.parametrize("triton_dir", [None, DEVICE_TRITON], ids=["installed", "device-image"])
def test_kernels_pass_the_gpu_compilers_front_end(triton_dir):
    """What the interpreter does not check, checked without a GPU: Triton's front end (Python -> TTIR) for an
    sm_90 target accepts the kernels at the 7B shape (e.g. a name bound to tensors of two shapes in the two
    branches of an `if` runs under the interpreter and fails there), and lowered to TTGIR the graphed kernels
    load the tensor as widely as a direct launch. In a process of its own: the interpreter's switch is set in
    this one. With the Triton installed here, and with the GPU machine's (another version: a kernel that only one
    of them rejects failed there once)."""
    import os
    import subprocess

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if triton_dir is not None:
        if not triton_dir.is_dir():
            pytest.skip(f"no Triton of the GPU image at {triton_dir} (`make setup` installs it)")
        env["PYTHONPATH"] = os.pathsep.join([str(triton_dir), *filter(None, [env.get("PYTHONPATH")])])
        where = subprocess.run([sys.executable, "-c", "import triton; print(triton.__file__)"], env=env,
                               capture_output=True, text=True, check=True).stdout
        assert where.startswith(str(triton_dir)), where
    script = Path(__file__).with_name("triton_front_end.py")
    done = subprocess.run([sys.executable, str(script)], check=False, env=env, capture_output=True, text=True,
                          timeout=300)
    if done.returncode == 3:
        pytest.skip(done.stdout.strip())
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    assert done.stdout.split() == ["stats_pass", "candidates", "fetch", "layouts"]
