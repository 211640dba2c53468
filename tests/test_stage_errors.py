"""Bad input: one line naming key, value and what is allowed; exit 2; nothing written or damaged."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
TINY_TRIGGER = {"surrogate_size": 150, "surrogate_epochs": 1, "surrogate_width": 4, "rounds": 2, "trigger_steps": 2, "batch_size": 16}


def cba(args: list[str], cwd: Path):
    """Run the real CLI in-process (the same code path as the console script)."""
    from typer.testing import CliRunner

    from stages.cli import app

    previous = Path.cwd()
    os.chdir(cwd)
    try:
        return CliRunner().invoke(app, args)
    finally:
        os.chdir(previous)


def write_params(folder: Path, **changes) -> None:
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["data"]["options"] = {"train_size": 200, "test_size": 50}
    params["trigger"]["params"].update(TINY_TRIGGER)  # the learned trigger, fitted in seconds
    for dotted, value in changes.items():
        node = params
        *parents, last = dotted.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    (folder / "params.yaml").write_text(yaml.safe_dump(params))


def assert_one_line_error(result, *fragments: str) -> None:
    assert result.exit_code == 2, (result.output, result.exception)
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.fixture()
def workdir(tmp_path):
    return tmp_path


@pytest.mark.parametrize("stage, key, value, fragments", [
    ("trigger", "trigger.name", "sparkle", ["trigger.name='sparkle'", "ctrl"]),
    ("trigger", "data.name", "imagenet", ["data.name='imagenet'", "synthetic"]),
    ("trigger", "trigger.params.alpha_", 3, ["trigger.params.alpha_"]),
    ("trigger", "trigger.params.surrogate_size", 100000, ["trigger.params.surrogate_size=100000", "at most 200"]),
    ("trigger", "trigger.params.linf", 300, ["trigger.params.linf=300", "(0, 255]"]),
    ("trigger", "data.root", "/no/such/folder", ["data.root='/no/such/folder'"]),
    ("trigger", "data.options.train_size", 0, ["data.options.train_size=0", "an integer of at least 10"]),
    ("trigger", "data.options.colour", True, ["data.options.colour=True", "synthetic takes"]),
    ("trigger", "trigger.params.head", "knn", ["trigger.params.head='knn'", "centroid"]),
    ("pretrain", "pretrain.simclr.temperature", 0, ["pretrain.simclr.temperature=0", "a number > 0"]),
    ("poison", "poison.mode", "flip", ["poison.mode='flip'", "clean_label"]),
    ("pretrain", "pretrain.method", "simclrr", ["pretrain.method='simclrr'", "simclr"]),
    ("pretrain", "pretrain.backbone", "vit", ["pretrain.backbone='vit'", "convnet"]),
    ("pretrain", "pretrain.epochs", "ten", ["pretrain.epochs='ten'", "integer"]),
    ("pretrain", "pretrain.simclr.temprature", 0.5, ["pretrain.simclr.temprature"]),
    ("pretrain", "pretrain.lr", "fast", ["pretrain.lr='fast'", "auto", "simclr 0.6"]),
    ("pretrain", "pretrain.lr", -0.1, ["pretrain.lr=-0.1", "> 0"]),
    ("defend", "defense.strip.n_overlays", 0, ["defense.strip.n_overlays"]),
    ("defend", "defense.strip.overlays", 3, ["defense.strip.overlays=3", "strip takes"]),
    ("poison", "seed", -1, ["seed=-1", "[0, 4294967295]"]),
    ("pretrain", "pretrain.simclr.temperature", "abc", ["pretrain.simclr.temperature='abc'", "a number > 0"]),
    ("pretrain", "pretrain.simclr.proj_dim", "x", ["pretrain.simclr.proj_dim='x'", "an integer"]),
    ("pretrain", "pretrain.device", "cuda:abc", ["pretrain.device='cuda:abc'", "cuda:N"]),
    ("pretrain", "pretrain.device", "cuda:7", ["pretrain.device='cuda:7'", "a GPU this machine has"]),
    ("finetune", "finetune.linear.weight_decays", "abc", ["finetune.linear.weight_decays='abc'", "list of numbers"]),
    ("finetune", "finetune.linear.val_fraction", 1.5, ["finetune.linear.val_fraction=1.5", "(0, 1)"]),
    ("finetune", "finetune.linear.epochs", 50, ["finetune.linear.epochs", "weight_decays"]),
])
def test_bad_parameter_is_one_line(workdir, stage, key, value, fragments):
    write_params(workdir, **{key: value})
    args = [stage, "strip"] if stage == "defend" else [stage]
    assert_one_line_error(cba(args, workdir), *fragments)


@pytest.mark.parametrize("rate", [1.5, -0.1])
def test_poison_rate_outside_unit_interval(workdir, rate):
    write_params(workdir, poison_rate=rate)
    assert_one_line_error(cba(["poison"], workdir), f"poison_rate={rate}", "[0.0, 1.0]")


def test_target_class_out_of_range_and_over_budget(workdir):
    write_params(workdir)
    assert cba(["trigger"], workdir).exit_code == 0
    write_params(workdir, target_class=10)
    assert_one_line_error(cba(["poison"], workdir), "target_class=10", "[0, 9]")
    write_params(workdir, poison_rate=0.5)
    assert_one_line_error(cba(["poison"], workdir), "poison_rate=0.5", "target class")
    assert not (workdir / "data/poisoned").exists()


def test_missing_data_path_and_corrupt_file(workdir):
    write_params(workdir, **{"data.name": "cifar10", "data.root": str(workdir), "data.options": {}})
    assert_one_line_error(cba(["trigger"], workdir), "data.root", "cifar-10-batches-py")
    folder = workdir / "cifar-10-batches-py"
    folder.mkdir()
    for name in ["data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5", "test_batch"]:
        (folder / name).write_bytes(b"\x80\x04garbage")
    assert_one_line_error(cba(["trigger"], workdir), "test_batch")


def test_corrupt_artifact_is_reported_and_left_alone(workdir):
    write_params(workdir)
    assert cba(["trigger"], workdir).exit_code == 0
    trigger_file = workdir / "data/trigger/trigger.safetensors"
    trigger_file.write_bytes(b"{not safetensors")
    assert_one_line_error(cba(["poison"], workdir), "trigger.safetensors")
    assert trigger_file.read_bytes() == b"{not safetensors"


def test_missing_params_file(workdir):
    assert_one_line_error(cba(["trigger", "--params", "nope.yaml"], workdir), "--params='nope.yaml'")


def test_help_explains_every_option(workdir):
    out = cba(["--help"], workdir).stdout
    for stage in ("trigger", "poison", "pretrain", "reference", "finetune", "analyze", "defend", "report"):
        assert stage in out
    assert "--params" in cba(["pretrain", "--help"], workdir).stdout


def test_pretrain_lr_auto_is_each_methods_own_rate():
    from cba.ssl import METHODS
    from stages.params import Params
    from stages.pretrain import learning_rate

    rates = {name: learning_rate(Params({"pretrain": {"lr": "auto"}}), name) for name in METHODS.names()}
    assert rates == {name: METHODS.get(name).default_lr for name in METHODS.names()}
    assert rates["simclr"] == 0.6 and rates["supervised"] == 0.05 and all(r > 0 for r in rates.values())
    assert learning_rate(Params({"pretrain": {"lr": 0.25}}), "byol") == 0.25


def test_every_stage_checks_target_class_against_the_data(workdir):
    """A target class the data lacks is refused before any work, and nothing already written changes."""
    write_params(workdir, **{"pretrain.epochs": 1, "pretrain.eval_every": 1})
    for stage in ("trigger", "poison", "pretrain"):
        assert cba([stage], workdir).exit_code == 0, stage
    encoder = (workdir / "data/pretrain/encoder.safetensors").read_bytes()
    write_params(workdir, target_class=10, **{"pretrain.epochs": 1, "pretrain.eval_every": 1})
    for args in (["pretrain"], ["finetune"], ["defend", "strip"]):
        assert_one_line_error(cba(args, workdir), "target_class=10", "[0, 9]")
    assert (workdir / "data/pretrain/encoder.safetensors").read_bytes() == encoder
    assert not (workdir / "metrics/finetune.json").exists()


@pytest.mark.parametrize("text, fragments", [
    ("seed: 0\npoison_rat: 0.1\n", ["poison_rat=0.1", "did you mean poison_rate?"]),
    ("seed: 0\npretrain:\n  epochs: 1\n  epochs: 2\n", ["epochs=2", "lines 3 and 4"]),
    ("seed: [0\n", ["valid YAML (line 2, column 1"]),
])
def test_params_file_typos_duplicates_and_syntax_are_one_line(workdir, text, fragments):
    (workdir / "params.yaml").write_text(text)
    assert_one_line_error(cba(["poison"], workdir), *fragments)


def test_an_epoch_count_the_loss_log_cannot_hold_is_refused_before_training(workdir):
    write_params(workdir)
    for stage in ("trigger", "poison"):
        assert cba([stage], workdir).exit_code == 0, stage
    write_params(workdir, **{"pretrain.epochs": 1_000_000_000})
    assert_one_line_error(cba(["pretrain"], workdir), "pretrain.epochs=1000000000", "at most")
    assert not (workdir / "data/pretrain").exists()


def test_a_corrupt_manifest_is_one_line_in_every_stage_that_reads_it(workdir):
    write_params(workdir, **{"pretrain.epochs": 1, "pretrain.eval_every": 1})
    for stage in ("trigger", "poison", "pretrain"):
        assert cba([stage], workdir).exit_code == 0, stage
    manifest = workdir / "data/poisoned/manifest.parquet"
    manifest.write_bytes(b"PAR1 garbage")
    for args in (["pretrain"], ["finetune"], ["analyze"], ["defend", "strip"]):
        assert_one_line_error(cba(args, workdir), "manifest.parquet", "not a readable parquet table")
    assert manifest.read_bytes() == b"PAR1 garbage"


def test_a_manifest_of_another_training_set_is_refused_before_any_work(workdir):
    """A valid table with too few rows: refused before training or probing, so no artifact mixes two runs."""
    import pandas as pd

    write_params(workdir, **{"pretrain.epochs": 1, "pretrain.eval_every": 1})
    for stage in ("trigger", "poison", "pretrain", "reference", "finetune"):
        assert cba([stage], workdir).exit_code == 0, stage
    manifest = workdir / "data/poisoned/manifest.parquet"
    pd.read_parquet(manifest).head(100).to_parquet(manifest)
    before = {path: path.read_bytes() for path in [*(workdir / "data/pretrain").glob("*.*"),
                                                   *(workdir / "data/finetune").glob("*"), *(workdir / "metrics").glob("*.json")]}
    for args in (["pretrain"], ["finetune"], ["defend", "strip"]):
        assert_one_line_error(cba(args, workdir), "manifest.parquet", "one row per training image (200", "has 100")
    assert all(path.read_bytes() == data for path, data in before.items())


def test_an_output_folder_that_is_a_file_fails_before_the_work(workdir):
    write_params(workdir)
    (workdir / "metrics").write_text("not a folder")
    assert_one_line_error(cba(["trigger"], workdir), "path='metrics'", "it is a file")
    assert not (workdir / "data/trigger").exists()  # refused before fitting anything
    assert (workdir / "metrics").read_text() == "not a folder"


def test_ctrl_c_in_pretraining_is_one_line_and_the_run_resumes(workdir):
    """SIGINT mid-training: exit 130, one line saying how to resume, no traceback; the rerun resumes."""
    import signal
    import subprocess
    import sys
    import time

    write_params(workdir, **{"pretrain.epochs": 200, "pretrain.width": 4, "pretrain.batch_size": 64,
                             "pretrain.eval_every": 1000, "pretrain.eval_bank_size": 50})
    for stage in ("trigger", "poison"):
        assert cba([stage], workdir).exit_code == 0
    command = [sys.executable, "-c", "from stages.cli import main; main()", "pretrain", "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    # A background job of a non-interactive shell (CI's, say) starts with SIGINT ignored, and children inherit
    # that: restore the default, so the child's Python turns SIGINT into KeyboardInterrupt as a terminal's would.
    def default_sigint() -> None:
        signal.signal(signal.SIGINT, signal.SIG_DFL)

    proc = subprocess.Popen(command, cwd=workdir, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=default_sigint)
    checkpoints = workdir / "data/pretrain/checkpoints"
    deadline = time.monotonic() + 300
    def finished_checkpoints() -> list[Path]:
        # A checkpoint is written to a hidden temporary file beside it and renamed when complete; interrupting
        # while only that file exists leaves nothing to resume from, so wait for the renamed one.
        return [p for p in checkpoints.glob("*.safetensors") if not p.name.startswith(".")]

    while not finished_checkpoints() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.2)
    assert proc.poll() is None, proc.communicate()
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, (out, err)
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err and lines[-1].startswith("interrupted:") and "resume" in lines[-1], err
    rerun = subprocess.Popen(command, cwd=workdir, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             preexec_fn=default_sigint)
    said = [rerun.stderr.readline() for _ in range(1)]
    while not said[-1].startswith("resuming") and said[-1] and len(said) < 50:  # said before its first epoch
        said.append(rerun.stderr.readline())
    rerun.send_signal(signal.SIGINT)  # no need to finish 200 epochs: it is enough that it resumed
    rest, rest_err = rerun.communicate(timeout=120)
    # On a failure, say how the rerun ended (its exit status, a signal if negative) and what else it wrote.
    assert said[-1].startswith("resuming from the checkpoint of epoch"), (said, rerun.returncode, rest[-2000:],
                                                                          rest_err[-2000:],
                                                                          sorted(p.name for p in checkpoints.iterdir()))


def _wrong_typed_defense_options() -> list:
    """(defense, option, a value of the wrong type) for every option of every defense."""
    import inspect

    from cba.defenses import DEFENSES

    wrong = {"int": "abc", "float": "abc", "bool": "yes", "str": 3, "float | str": [1], "bool | str": 3, "list[float]": "abc"}
    cases = []
    for name in DEFENSES.names():
        for option in list(inspect.signature(DEFENSES.get(name).__init__).parameters.values())[1:]:
            cases.append((name, option.name, wrong[str(option.annotation)]))
    return cases


@pytest.mark.parametrize("name, option, value", _wrong_typed_defense_options())
def test_every_defense_option_of_the_wrong_type_is_one_line(name, option, value):
    from cba.defenses import build_defense
    from cba.errors import ConfigError
    from stages.common import defense_section

    with pytest.raises(ConfigError, match=rf"^{option}="):  # the library names the option plainly
        build_defense(name, **{option: value})
    with pytest.raises(ConfigError, match=rf"^defense\.{name}\.{option}=") as err, defense_section(name):
        build_defense(name, **{option: value})
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("key, value, fragment", [
    ("defenses", ["strip", "sparkle"], "defenses='sparkle'"),
    ("defense.scan.ridge_", 0.1, "defense.scan.ridge_=0.1"),
    ("defense.spectral.expected_rate", "abc", "defense.spectral.expected_rate='abc'"),
    ("finetune.linear.max_iter", 0, "finetune.linear.max_iter=0"),
    ("analyze.embedding", "umap3d", "analyze.embedding='umap3d'"),
    ("pretrain.epochs", 0, "pretrain.epochs=0"),
])
def test_validate_checks_every_section_before_any_data_is_read(workdir, key, value, fragment):
    write_params(workdir, **{key: value})
    assert_one_line_error(cba(["validate"], workdir), fragment)
    assert not (workdir / "data").exists() or not any((workdir / "data").iterdir())


def test_validate_passes_the_shipped_params_and_writes_a_constant_file(workdir):
    (workdir / "params.yaml").write_text((REPO / "params.yaml").read_text())
    result = cba(["validate"], workdir)
    assert result.exit_code == 0, result.output
    first = (workdir / "data/params_checked.json").read_bytes()
    write_params(workdir, **{"pretrain.epochs": 3})
    assert cba(["validate"], workdir).exit_code == 0
    assert (workdir / "data/params_checked.json").read_bytes() == first


def test_finetune_without_the_reference_victim_names_it_before_any_output(workdir):
    """The reading of the reference victim is part of finetune's input check: no metrics are written without it."""
    write_params(workdir, **{"pretrain.epochs": 1, "pretrain.eval_every": 1})
    for stage in ("trigger", "poison", "pretrain"):
        assert cba([stage], workdir).exit_code == 0, stage
    assert_one_line_error(cba(["finetune"], workdir), "data/reference/encoder.safetensors", "run the stage that writes it")
    assert not (workdir / "metrics/finetune.json").exists() and not (workdir / "data/finetune").exists()
