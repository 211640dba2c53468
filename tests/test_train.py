import re

import numpy as np
import pytest
import torch

from cba.augment import build_augment
from cba.models import build_backbone
from cba.ssl import build_method
from cba.train import Checkpointer, TrainConfig, epoch_batches, lr_at, train


def _images(n=96, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, 16, 16, 3), dtype=np.uint8), np.arange(n) % 4


def _method(seed=0):
    torch.manual_seed(seed)
    return build_method("simclr", build_backbone("convnet", width=4), proj_hidden_dim=16, proj_dim=8)


def test_epoch_batches_are_full_and_cover_everything():
    batches = epoch_batches(100, 32, torch.Generator().manual_seed(0))
    assert [len(b) for b in batches] == [32] * 4
    assert set(torch.cat(batches).tolist()) == set(range(100))


def test_lr_schedule_warms_up_then_decays():
    lrs = [lr_at(s, 100, 10, 1.0) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:])) and lrs[-1] < 0.01


def test_per_sample_log_fills_every_sample_and_lines_up():
    images, labels = _images()
    result = train(_method(), images, labels, build_augment("ssl", 16), TrainConfig(epochs=2, batch_size=32, warmup_epochs=0),
                   torch.device("cpu"), progress=False)
    assert result.losses.shape == (2, 96) and np.isfinite(result.losses).all()
    poisoned = np.zeros(96, dtype=bool)
    poisoned[[3, 50]] = True
    frame = result.loss_frame(poisoned)
    assert len(frame) == 192
    row = frame[(frame.epoch == 2) & (frame["index"] == 50)].iloc[0]
    assert row.poisoned and row.loss == pytest.approx(result.losses[1, 50])


def test_resume_matches_uninterrupted_run(tmp_path):
    images, labels = _images()
    aug = build_augment("ssl", 16)
    config = TrainConfig(epochs=3, batch_size=32, warmup_epochs=1, seed=5)
    cpu = torch.device("cpu")

    full = _method()
    full_result = train(full, images, labels, aug, config, cpu, checkpointer=Checkpointer(tmp_path / "a", "fp"), progress=False)

    # "Kill" after epoch 2: train a 2-epoch prefix by trimming the schedule's view of time is not
    # possible, so run the same config and delete the last checkpoint, then resume.
    first = _method()
    train(first, images, labels, aug, config, cpu, checkpointer=Checkpointer(tmp_path / "b", "fp", keep=5), progress=False)
    (tmp_path / "b" / "fp-epoch_0003.safetensors").unlink()
    resumed = _method(seed=123)  # different init: everything must come from the checkpoint
    resumed_result = train(resumed, images, labels, aug, config, cpu, checkpointer=Checkpointer(tmp_path / "b", "fp"), progress=False)

    np.testing.assert_allclose(resumed_result.losses, full_result.losses, rtol=1e-5, atol=1e-6)
    for (name, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    # The resumed run reports the restored epochs and still times all of them.
    assert full_result.resumed_epochs == 0 and resumed_result.resumed_epochs == 2
    assert [row["epoch"] for row in resumed_result.curves] == [1, 2, 3]
    assert all(row["seconds"] > 0 for row in resumed_result.curves)
    assert resumed_result.seconds == pytest.approx(sum(row["seconds"] for row in resumed_result.curves))


def test_checkpoint_with_other_fingerprint_is_ignored(tmp_path):
    images, labels = _images()
    config = TrainConfig(epochs=1, batch_size=32, warmup_epochs=0)
    train(_method(), images, labels, build_augment("none"), config, torch.device("cpu"),
          checkpointer=Checkpointer(tmp_path, "old"), progress=False)
    model = _method(seed=9)
    epoch, _ = Checkpointer(tmp_path, "new").load_latest(model, torch.optim.SGD(model.parameters(), lr=0.1),
                                                         np.zeros((1, 96), dtype=np.float32))
    assert epoch == 0


def test_corrupt_checkpoint_is_skipped(tmp_path):
    (tmp_path / "fp-epoch_0001.safetensors").write_bytes(b"not a safetensors file")
    model = _method()
    epoch, _ = Checkpointer(tmp_path, "fp").load_latest(model, torch.optim.SGD(model.parameters(), lr=0.1),
                                                        np.zeros((1, 96), dtype=np.float32))
    assert epoch == 0


def test_checkpoints_keep_only_the_newest(tmp_path):
    images, labels = _images(32)
    train(_method(), images, labels, build_augment("none"), TrainConfig(epochs=4, batch_size=16, warmup_epochs=0),
          torch.device("cpu"), checkpointer=Checkpointer(tmp_path, "fp", keep=2), progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fp-epoch_0003.safetensors", "fp-epoch_0004.safetensors"]


def test_cleanup_leaves_other_runs_checkpoints_alone(tmp_path):
    """A shorter run with other settings in the same folder neither deletes nor is deleted by a longer one."""
    images, labels = _images(32)
    cpu = torch.device("cpu")
    config = TrainConfig(epochs=6, batch_size=16, warmup_epochs=0)
    train(_method(), images, labels, build_augment("none"), config, cpu, checkpointer=Checkpointer(tmp_path, "long"),
          progress=False)
    short = Checkpointer(tmp_path, "short")
    train(_method(), images, labels, build_augment("none"), TrainConfig(epochs=4, batch_size=16, warmup_epochs=0), cpu,
          checkpointer=short, progress=False)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["long-epoch_0005.safetensors", "long-epoch_0006.safetensors",
                     "short-epoch_0003.safetensors", "short-epoch_0004.safetensors"]
    model = _method()
    epoch, _ = short.load_latest(model, torch.optim.SGD(model.parameters(), lr=0.1), np.zeros((4, 32), dtype=np.float32))
    assert epoch == 4


def test_resume_fingerprint_covers_the_training_code(tmp_path):
    """Editing the loss or the curves' reader must invalidate old checkpoints; editing the report must not."""
    import shutil
    from pathlib import Path

    import cba
    from cba.env import source_digest
    from stages.pretrain import TRAINING_CODE

    def code_digest(root):
        return source_digest(root, TRAINING_CODE)

    package = Path(cba.__file__).parent
    copy = tmp_path / "cba"
    shutil.copytree(package, copy, ignore=shutil.ignore_patterns("__pycache__"))
    before = code_digest(copy)
    assert before == code_digest(package)
    (copy / "report.py").write_text((copy / "report.py").read_text() + "\n# unrelated\n")
    assert code_digest(copy) == before
    loss = copy / "ssl" / "simclr.py"
    loss.write_text(loss.read_text().replace("def ", "def  ", 1))
    after_loss = code_digest(copy)
    assert after_loss != before
    assert "ssl" in TRAINING_CODE
    # A checkpoint carries the kNN curves so far, scored by evaluate.py: a reader changed there must not resume them.
    reader = copy / "evaluate.py"
    reader.write_text(reader.read_text().replace("def ", "def  ", 1))
    assert code_digest(copy) != after_loss


def test_resume_fingerprint_and_dvc_yaml_name_the_same_training_code():
    """The fingerprint's code list repeats dvc.yaml by hand; the two must not drift apart.

    Every package path the reference stage depends on shapes the weights, so the fingerprint must cover it;
    every path the fingerprint covers must be a pretrain dependency, or DVC would keep a stale encoder while
    the checkpoints refuse it."""
    from pathlib import Path

    import yaml

    from stages.pretrain import TRAINING_CODE

    stages = yaml.safe_load((Path(__file__).resolve().parents[1] / "dvc.yaml").read_text())["stages"]

    def package_deps(stage):
        return {dep.removeprefix("cba/") for dep in stages[stage]["deps"] if dep.startswith("cba/")}

    assert package_deps("reference") <= set(TRAINING_CODE)
    assert set(TRAINING_CODE) <= package_deps("pretrain")
    assert set(TRAINING_CODE) - package_deps("reference") == {"evaluate.py"}  # only pretrain scores curves


def test_a_diverging_run_stops_with_one_line_and_writes_no_checkpoint(tmp_path):
    """lr 1e6 sends the loss to NaN; NaN weights would later read as ASR 1.0 on target 0."""
    from cba.errors import ConfigError

    images, labels = _images()
    config = TrainConfig(epochs=3, batch_size=32, lr=1e6, warmup_epochs=0, seed=0)
    with pytest.raises(ConfigError) as caught:
        train(_method(), images, labels, build_augment("ssl", 16), config, torch.device("cpu"),
              checkpointer=Checkpointer(tmp_path, "fp"), progress=False)
    message = str(caught.value)
    assert "\n" not in message and "lr=1000000.0" in message
    failed_epoch = int(re.search(r"at epoch (\d+), step \d+", message).group(1))
    # Only the finite epochs before the blow-up were checkpointed.
    assert sorted(p.name for p in tmp_path.glob("*.safetensors")) == [f"fp-epoch_{e:04d}.safetensors" for e in range(1, failed_epoch)][-2:]


def test_nan_weights_are_refused_by_the_evaluators():
    from cba.errors import ConfigError
    from cba.evaluate import evaluate_encoder, extract_features

    images, labels = _images(40)
    encoder = _method().encoder
    with torch.no_grad():
        next(encoder.parameters()).fill_(float("nan"))
    with pytest.raises(ConfigError, match="non-finite features"):
        extract_features(encoder, images)
    with pytest.raises(ConfigError, match="non-finite"):
        evaluate_encoder(encoder, images, labels, images, labels, images, 0, 4)


@pytest.mark.parametrize("damage", ["epoch", "losses", "shape", "curves"])
def test_a_checkpoint_with_bad_contents_is_skipped_for_the_previous_one(tmp_path, damage):
    """Right fingerprint, bad contents: resume falls back to the older good checkpoint, never crashes."""
    import json

    from safetensors import safe_open

    from cba.io import load_tensors, save_tensors

    images, labels = _images(32)
    config = TrainConfig(epochs=2, batch_size=16, warmup_epochs=0)
    train(_method(), images, labels, build_augment("none"), config, torch.device("cpu"),
          checkpointer=Checkpointer(tmp_path, "fp"), progress=False)
    newest = tmp_path / "fp-epoch_0002.safetensors"
    tensors = load_tensors(newest)
    with safe_open(str(newest), framework="pt") as handle:
        meta = dict(handle.metadata())
    if damage == "epoch":
        meta["epoch"] = "abc"
    elif damage == "losses":
        del tensors["log.losses"]
    elif damage == "shape":
        key = next(k for k in tensors if k.startswith("model."))
        tensors[key] = torch.zeros(3)
    else:
        meta["curves"] = "{not json"
    save_tensors(newest, tensors, metadata=meta)
    model = _method(seed=9)
    epoch, curves = Checkpointer(tmp_path, "fp").load_latest(model, torch.optim.SGD(model.parameters(), lr=0.1),
                                                             np.zeros((2, 32), dtype=np.float32))
    assert epoch == 1 and len(curves) == 1
    assert json.loads(json.dumps(curves))  # the good checkpoint's curves, intact
