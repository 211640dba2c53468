"""What every stage shares: artifact paths, the one-line error handling, data params."""

from __future__ import annotations

import contextlib
import functools
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, TypeVar

import typer

from cba.data import ImageSet, load_dataset
from cba.defenses import Defense, build_defense
from cba.defenses.registry import options as defense_options
from cba.data.io import load_imageset
from cba.errors import ConfigError, in_section
from cba.io import read_json, write_json
from cba.triggers import TRIGGERS, Trigger, build_trigger
from stages.params import Params

if TYPE_CHECKING:  # pandas loads only in the stages that read tables
    import pandas as pd

TRIGGER_DIR = Path("data/trigger")
POISON_DIR = Path("data/poisoned")
PRETRAIN_DIR = Path("data/pretrain")
REFERENCE_DIR = Path("data/reference")  # the reference victim: the pretraining recipe without poisons
FINETUNE_DIR = Path("data/finetune")
ANALYSIS_DIR = Path("data/analysis")
METRICS_DIR = Path("metrics")
DETAILS_DIR = METRICS_DIR / "details"  # each stage's full record; not a DVC metrics file
PLOTS_DIR = Path("plots")
REPORT_DIR = Path("reports")
BENCH_DIR = Path("bench/results")  # committed outputs of the bench scripts, shown in the report

PARAMS_OPTION = typer.Option(Path("params.yaml"), "--params", "-p", help="Path of the params file to read.")
PROGRESS_OPTION = typer.Option(True, "--progress/--no-progress",
                               help="Show progress: a bar on a terminal, a plain line every 30 s in a log.")

F = TypeVar("F", bound=Callable[..., Any])
# What Ctrl-C leaves behind, per stage: artifacts are written whole (temporary file, then rename) or not at all.
INTERRUPTED = {
    "pretrain": "the last finished epoch is checkpointed in data/pretrain/checkpoints; run `cba pretrain` "
                "(or `dvc repro`) again to resume from it",
    "reference": "the last finished epoch is checkpointed in data/reference/checkpoints; run `cba reference` "
                 "(or `dvc repro`) again to resume from it",
    "": "no artifact was half-written; run the stage (or `dvc repro`) again to redo it",
}


def one_line_errors(fn: F) -> F:
    """Turn bad input into one line on stderr and exit code 2, with no traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except ConfigError as exc:
            print(f"error: {exc}", file=sys.stderr)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            print(f"\ninterrupted: {INTERRUPTED.get(fn.__name__, INTERRUPTED[''])}", file=sys.stderr)
            raise typer.Exit(130) from None

    return wrapper


DATA_KEYS = ("name", "root", "options")


def data_source(params: Params) -> tuple[str, str | None, dict[str, Any]]:
    """Validate the data section without loading anything."""
    section = params.section("data", DATA_KEYS)
    name = params.text("data.name", "synthetic")
    root = params.text("data.root", None)
    options = params.section("data.options")
    # A download creates the folder; otherwise it must hold the files already.
    if root is not None and not Path(root).expanduser().exists() and options.get("download") is not True:
        raise ConfigError("data.root", root, "an existing folder holding the data set's files (or data.options.download: true)")
    del section
    return name, root, options


def load_split(params: Params, split: str) -> ImageSet:
    name, root, options = data_source(params)
    seed = params.integer("seed", 0, low=0, high=2**32 - 1)
    with in_section("data.options", options), in_section("data", ["name", "root"]):
        return load_dataset(name, split, root=root, seed=seed, **options)


# The library names a parameter as its own function does; these put the params.yaml section in front.
@contextlib.contextmanager
def trigger_section(params: Params) -> Iterator[None]:
    """Errors of the trigger named in params.yaml, keyed where params.yaml has them."""
    name = params.choice("trigger.name", TRIGGERS.names())
    known = set(params.section("trigger.params")) | set(TRIGGERS.get(name).defaults)
    with in_section("trigger", ["name", "params"]), in_section("trigger.params", known):
        yield


def defense_section(name: str, given: Iterable[str] = ()) -> contextlib.AbstractContextManager[None]:
    """Errors of defense `name`, keyed `defense.<name>.<option>` for its own options and the keys `given`
    in its section (an unknown one among them is named where the user wrote it)."""
    return in_section(f"defense.{name}", set(defense_options(name)) | set(given))


def trigger_from_params(params: Params, seed: int, image_size: int = 32) -> Trigger:
    with trigger_section(params):  # checks trigger.name first
        return build_trigger(params.raw("trigger.name"), params.section("trigger.params"), seed=seed, image_size=image_size)


def defense_from_params(params: Params, name: str) -> Defense:
    section = params.section(f"defense.{name}")
    with defense_section(name, section):
        return build_defense(name, **section)


def check_target(target: int, data: ImageSet) -> None:
    """Every stage that uses target_class checks it against the data's classes before any work."""
    if not 0 <= target < data.num_classes:
        raise ConfigError("target_class", target, f"an integer in [0, {data.num_classes - 1}] ({data.num_classes} classes)")


def check_outputs(*folders: Path) -> None:
    """Fail now, not after the work, if a stage could not write its output folders.

    Nothing is created here: a refused run leaves the tree as it was."""
    for folder in folders:
        for part in [folder, *folder.parents]:
            if part.exists() and not part.is_dir():
                raise ConfigError("path", str(part), f"a folder, but it is a file; move it so the stage can write {folder}/")
        existing = next(part for part in [folder, *folder.parents] if part.exists())
        if not os.access(existing, os.W_OK | os.X_OK):
            raise ConfigError("path", str(existing), f"a folder this user can write to (the stage writes {folder}/)")


# Kept out of the DVC metrics files, which hold comparable scalars only: the environment, timings, the attack's
# description, and per-class or per-setting breakdowns (text and lists are left out by type).
DETAIL_ONLY = frozenset({"env", "seconds", "fit_seconds", "attack", "logit_gain", "val_acc", "landing", "iterations",
                         "grad_max", "per_class"})


def metric_scalars(record: dict) -> dict:
    """The numbers and booleans of `record`, nested as they are, less DETAIL_ONLY keys, text, lists and nulls."""
    out: dict = {}
    for key, value in record.items():
        if key in DETAIL_ONLY or value is None:
            continue
        if isinstance(value, dict):
            value = metric_scalars(value)
            if value:
                out[key] = value
        elif isinstance(value, (bool, int, float)) and not (isinstance(value, float) and value != value):
            out[key] = value
    return out


def write_metrics(name: str, record: dict) -> None:
    """metrics/NAME.json gets the comparable scalars (what `dvc metrics diff` and `dvc exp show` compare);
    metrics/details/NAME.json gets the whole record, which the report reads."""
    write_json(DETAILS_DIR / f"{name}.json", record)
    write_json(METRICS_DIR / f"{name}.json", metric_scalars(record))


def read_details(name: str) -> dict:
    """A stage's whole record (see `write_metrics`); empty if that stage has not run."""
    path = DETAILS_DIR / f"{name}.json"
    return read_json(path) if path.exists() else {}


MANIFEST_COLUMNS = ("index", "label", "original_label", "poisoned")


def read_table(path: Path, columns: tuple[str, ...] = ()) -> "pd.DataFrame":
    """A parquet or CSV artifact with the named columns, or one line saying what is wrong with it."""
    import pandas as pd  # pandas is needed only by the stages that read tables

    path = Path(path)
    if not path.exists():
        raise ConfigError("path", str(path), "the file does not exist; run the stage that writes it first")
    try:
        frame = pd.read_parquet(path) if path.suffix == ".parquet" else pd.read_csv(path)
    except Exception as exc:  # pyarrow and pandas raise many types for a corrupt file
        raise ConfigError("path", str(path), f"not a readable {path.suffix[1:]} table ({type(exc).__name__}); "
                          "rerun the stage that writes it") from None
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise ConfigError("path", str(path), f"needs columns {list(columns)}; missing {missing}")
    return frame


def read_manifest(train_size: int) -> "pd.DataFrame":
    """The poison manifest, checked against the training set it describes: one row per image, in order."""
    import numpy as np

    path = POISON_DIR / "manifest.parquet"
    manifest = read_table(path, MANIFEST_COLUMNS)
    if len(manifest) != train_size or not np.array_equal(manifest["index"].to_numpy(), np.arange(train_size)):
        raise ConfigError("path", str(path), f"must have one row per training image ({train_size}, indexed in order), "
                          f"has {len(manifest)}; rerun `cba poison`")
    return manifest


def load_stage_set(name: str) -> ImageSet:
    """An image set the poison stage wrote: 'train', 'clean_train' or 'test'."""
    return load_imageset(POISON_DIR / f"{name}.safetensors")
