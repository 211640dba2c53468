"""Pretraining on several processes (gloo on CPU) computes what one process computes on the whole batch."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from cba import distributed
from cba.errors import ConfigError
from cba.models import build_backbone
from cba.ssl import build_method
from cba.train import TrainConfig, train

from test_stage_errors import cba, write_params

EXACT = ("simclr", "byol")          # no randomness besides the augmentation, switched off here
RUNS = ("mocov2", "supervised")     # MoCo's shuffled-BN keys draw a random permutation per rank
# Float sums run in another order across ranks; over two epochs of SGD this is the drift we allow
# (measured: 2e-5 on these tests' data; one process at 1 and at 2 threads differs by 1.3e-3 on the
# CLI test's epoch losses, two ranks and one process by 1.8e-4).
LOSS_TOLERANCE = 2e-3
STAGE_TOLERANCE = 1e-2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_data(n: int = 128) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (n, 16, 16, 3), dtype=np.uint8), rng.integers(0, 4, n)


def run_method(name: str, images: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    method = build_method(name, build_backbone("convnet", width=4), num_classes=4)
    config = TrainConfig(epochs=2, batch_size=32, lr=0.05, warmup_epochs=0, seed=0, eval_every=100)
    result = train(method, images, labels, nn.Identity(), config, torch.device("cpu"), progress=False)
    return result.losses, {k: v.detach().clone() for k, v in method.state_dict().items()}


def _worker(rank: int, port: int, out: str, methods: tuple[str, ...]) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    images, labels = tiny_data()
    saved = {}
    for name in methods:
        losses, state = run_method(name, images, labels)
        saved[f"{name}.losses"] = losses
        saved.update({f"{name}.state.{k}": v.float().numpy() for k, v in state.items()})
    np.savez(Path(out) / f"rank{rank}.npz", **saved)
    try:  # disagreeing inputs are refused on every rank
        distributed.check_same_everywhere("data/poisoned/train.safetensors", f"digest-{rank}")
        refused = "no"
    except ConfigError as exc:
        refused = str(exc)
    (Path(out) / f"refused{rank}.txt").write_text(refused)
    try:  # a global batch the ranks cannot share evenly
        method = build_method("simclr", build_backbone("convnet", width=4), num_classes=4)
        train(method, images, labels, nn.Identity(), TrainConfig(epochs=1, batch_size=33), torch.device("cpu"), progress=False)
        uneven = "no"
    except ConfigError as exc:
        uneven = str(exc)
    (Path(out) / f"uneven{rank}.txt").write_text(uneven)
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ddp")
    mp.spawn(_worker, args=(free_port(), str(out), EXACT + RUNS), nprocs=2, join=True)
    return out


@pytest.mark.parametrize("name", EXACT)
def test_two_ranks_match_one_process_on_the_whole_batch(two_ranks, name):
    images, labels = tiny_data()
    losses, state = run_method(name, images, labels)
    rank0, rank1 = (np.load(two_ranks / f"rank{r}.npz") for r in (0, 1))
    # Every rank keeps the whole per-sample loss log, and it matches the single-process one.
    assert np.isfinite(rank0[f"{name}.losses"]).all()
    np.testing.assert_allclose(rank0[f"{name}.losses"], losses, atol=LOSS_TOLERANCE, rtol=0)
    np.testing.assert_array_equal(rank0[f"{name}.losses"], rank1[f"{name}.losses"])
    # The loss moved during training, so the agreement is not that of two untrained models.
    assert abs(losses[1].mean() - losses[0].mean()) > 10 * LOSS_TOLERANCE
    for key, value in state.items():
        if "num_batches_tracked" in key:
            continue
        np.testing.assert_allclose(rank0[f"{name}.state.{key}"], value.float().numpy(), atol=5e-3, rtol=0, err_msg=key)


@pytest.mark.parametrize("name", EXACT + RUNS)
def test_ranks_hold_identical_weights(two_ranks, name):
    rank0, rank1 = (np.load(two_ranks / f"rank{r}.npz") for r in (0, 1))
    keys = [k for k in rank0.files if k.startswith(f"{name}.state.")]
    assert keys and np.isfinite(rank0[f"{name}.losses"]).all()
    for key in keys:
        np.testing.assert_array_equal(rank0[key], rank1[key], err_msg=key)


def test_ranks_refuse_different_inputs_and_uneven_batches_everywhere(two_ranks):
    for r in (0, 1):
        line = (two_ranks / f"refused{r}.txt").read_text()
        assert "data/poisoned/train.safetensors" in line and "rank 1" in line and "same file on every rank" in line
        line = (two_ranks / f"uneven{r}.txt").read_text()
        assert line.startswith("batch_size=33 ") and "multiple of the 2 processes" in line  # the stage adds pretrain.


def test_cross_rank_batchnorm_keeps_plain_batchnorm_keys():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.LazyLinear(2), nn.BatchNorm1d(2, affine=False))
    before = set(model.state_dict())
    swapped = distributed._swap_batchnorm(model)
    assert isinstance(swapped[1], distributed.CrossRankBatchNorm) and isinstance(swapped[4], distributed.CrossRankBatchNorm)
    assert set(swapped.state_dict()) == before
    x = torch.randn(8, 3, 6, 6)
    reference = nn.BatchNorm2d(4)
    assert torch.allclose(swapped[1](swapped[0](x)), reference(model[0](x)), atol=1e-5)  # one process: plain BN


@pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun is not on PATH")
def test_torchrun_cba_pretrain_writes_once_matches_one_process_and_resumes(tmp_path):
    changes = {"pretrain.epochs": 2, "pretrain.batch_size": 32, "pretrain.width": 4, "pretrain.augmentation.kind": "none",
               "pretrain.eval_every": 1, "pretrain.eval_bank_size": 100, "pretrain.device": "cpu",
               "pretrain.lr": 0.02, "pretrain.warmup_epochs": 0}
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir()
    write_params(one, **changes)
    for stage in ("trigger", "poison"):
        result = cba([stage] + (["--no-progress"] if stage == "trigger" else []), one)
        assert result.exit_code == 0, result.output
    shutil.copytree(one, two)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cba_bin = shutil.which("cba") or f"{sys.executable} -m stages.cli"
    single = subprocess.run([*cba_bin.split(), "pretrain", "--no-progress"], cwd=one, env=env, capture_output=True, text=True)
    assert single.returncode == 0, single.stderr
    launch = ["torchrun", "--no-python", "--standalone", "--nproc_per_node", "2", *cba_bin.split(), "pretrain", "--no-progress"]
    multi = subprocess.run(launch, cwd=two, env=env, capture_output=True, text=True)
    assert multi.returncode == 0, multi.stderr[-3000:]
    assert multi.stdout.count("pretrain simclr: kNN ACC") == 1  # one rank reports, one rank writes

    curve_one = pd.read_csv(one / "plots/pretrain_loss.csv")
    curve_two = pd.read_csv(two / "plots/pretrain_loss.csv")
    # The stage's data makes float-order differences grow about tenfold a step (docs/results/cross-checks.md), so the
    # stage is held to 1% of the loss; the exact agreement is the job of the train()-level tests above.
    np.testing.assert_allclose(curve_two["loss"], curve_one["loss"], rtol=STAGE_TOLERANCE)
    log_one = pd.read_parquet(one / "data/pretrain/losses.parquet")
    log_two = pd.read_parquet(two / "data/pretrain/losses.parquet")
    assert log_two["loss"].notna().all() and (log_two[["epoch", "index", "poisoned"]] == log_one[["epoch", "index", "poisoned"]]).all().all()
    # Single samples drift further than the means: on this data a 1e-7 difference in float order grows
    # about tenfold a step, as it does when one process changes its thread count.
    assert np.corrcoef(log_two["loss"], log_one["loss"])[0, 1] > 0.99
    checkpoints = sorted((two / "data/pretrain/checkpoints").glob("*.safetensors"))
    assert len(checkpoints) == 2  # written by rank 0 alone: one file per epoch, kept 2

    again = subprocess.run(launch, cwd=two, env=env, capture_output=True, text=True)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stderr.count("resuming from the checkpoint of epoch 2 of 2") == 1
    pd.testing.assert_frame_equal(pd.read_csv(two / "plots/pretrain_loss.csv"), curve_two)

    # The reference victim trains through the same runner: one rank reports and writes, and two processes
    # end where one does (on the clean set, which every rank checks it shares).
    single = subprocess.run([*cba_bin.split(), "reference", "--no-progress"], cwd=one, env=env, capture_output=True, text=True)
    assert single.returncode == 0, single.stderr
    launch[launch.index("pretrain")] = "reference"
    multi = subprocess.run(launch, cwd=two, env=env, capture_output=True, text=True)
    assert multi.returncode == 0, multi.stderr[-3000:]
    assert multi.stdout.count("reference simclr without poisons") == 1
    final_one, final_two = (json.loads((d / "metrics/reference.json").read_text())["final_loss"] for d in (one, two))
    np.testing.assert_allclose(final_two, final_one, rtol=STAGE_TOLERANCE)
    assert len(list((two / "data/reference/checkpoints").glob("*.safetensors"))) == 2
