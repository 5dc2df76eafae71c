"""Profiling on several ranks (torch.distributed, gloo on the CPU): each rank traces a shard of the windows
and the merged profile equals the single-process one."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from outlierlab.errors import OutlierlabError
from outlierlab.testing import plant_super_weight, random_windows, tiny_model
from outlierlab.tracing import ProfileConfig, profile
from outlierlab.tracing.distributed import shard

FAMILY, N_WINDOWS, BATCH = "llama", 8, 2


def _model():
    model = tiny_model(FAMILY)
    plant_super_weight(model, 1, 7, 13, 1e4)
    return model


def _rank(rank: int, world: int, port: int, out: str) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        model = _model()
        result = profile(model, random_windows(model, n=N_WINDOWS, seq_len=32), ProfileConfig(batch_size=BATCH),
                         distributed=True)
        torch.save({"stats": {k: r.stats for k, r in result.results.items()},
                    "mas": result.massive_activations, "cos": result.channel_outliers,
                    "data": result.data_info}, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_shards_cover_the_windows_in_order():
    assert [shard(10, r, 3) for r in range(3)] == [(0, 4), (4, 7), (7, 10)]
    assert [shard(4, r, 4) for r in range(4)] == [(0, 1), (1, 2), (2, 3), (3, 4)]
    with pytest.raises(OutlierlabError, match="at least one per rank"):
        shard(2, 0, 3)


def test_two_ranks_merge_to_the_single_process_profile(tmp_path):
    model = _model()
    single = profile(model, random_windows(model, n=N_WINDOWS, seq_len=32), ProfileConfig(batch_size=BATCH))
    mp.spawn(_rank, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    for got in ranks:  # every rank ends with the merged profile of all windows
        assert got["data"]["ranks"] == 2
        assert got["mas"] == single.massive_activations and got["mas"]  # the planted MA, same windows
        assert got["cos"] == single.channel_outliers
        assert set(got["stats"]) == set(single.results)
        for key, r in single.results.items():
            for name, value in r.stats.items():
                other = got["stats"][key][name]
                if isinstance(value, torch.Tensor):
                    torch.testing.assert_close(other, value, rtol=1e-6, atol=0, msg=f"{key} {name}")
                else:
                    assert other == pytest.approx(value, rel=1e-9), (key, name)


def test_cli_profile_under_torchrun(tiny_folder, cache, tmp_path):
    """``torchrun --nproc-per-node 2 outlierlab profile``: rank 0 writes the merged report, which finds what a
    single process finds."""
    import json
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    script = shutil.which("outlierlab") or str(Path(sys.executable).parent / "outlierlab")
    args = ["profile", "--model", str(tiny_folder), "--data", str(tmp_path / "text.txt"), "--seq-len", "32",
            "-n", "6", "-b", "1", "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, script, *args, "--out", str(tmp_path / "one")], check=True, env=env,
                   capture_output=True)
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                          "--master-port", str(_free_port()), script, *args, "--out", str(tmp_path / "two")],
                         check=False, env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.count("wrote ") == 1 and "(2 ranks)" in run.stdout  # rank 0 alone writes
    one, two = (json.loads((tmp_path / d / "report.json").read_text()) for d in ("one", "two"))
    assert two["data"]["ranks"] == 2
    for key in ("massive_activations", "channel_outliers"):
        assert two[key] == one[key]
    assert two["layers"] == one["layers"]


def test_offloaded_model_profiles_like_the_model_in_memory(tiny_folder, cache, tmp_path):
    """``--max-memory``: weights that do not fit stay on disk (accelerate) and run layer by layer; the
    profile, weight statistics included, equals the one of the model held in memory."""
    from outlierlab.models.loader import input_device, load_model

    whole = load_model(str(tiny_folder))
    offloaded = load_model(str(tiny_folder), max_memory="cpu=20KB")
    assert any(p.device.type == "meta" for p in offloaded.model.parameters())  # really on disk
    assert input_device(offloaded.model).type == "cpu"
    ids = random_windows(whole.model, n=4, seq_len=32)
    cfg = ProfileConfig(batch_size=2)
    a, b = profile(whole.model, ids, cfg), profile(offloaded.model, ids, cfg)
    assert a.massive_activations == b.massive_activations and a.channel_outliers == b.channel_outliers
    for key, r in a.results.items():
        for name, value in r.stats.items():
            if isinstance(value, torch.Tensor):
                torch.testing.assert_close(b.results[key].stats[name], value, rtol=1e-5, atol=1e-6)
    assert a.weights and set(a.weights) == set(b.weights)  # weight statistics read from the offloaded layers
    for k, value in a.weights.items():
        torch.testing.assert_close(b.weights[k], value)
    assert all(p.device.type == "meta" for p in offloaded.model.model.layers[0].parameters())  # back on disk
