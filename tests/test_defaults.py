"""params.yaml is the one source of defaults: the code's own defaults must agree with it."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
import yaml

from cba.defenses import DEFENSES

PARAMS = yaml.safe_load((Path(__file__).resolve().parents[1] / "params.yaml").read_text())


def _plain(value):
    return list(value) if isinstance(value, tuple) else value


@pytest.mark.parametrize("name", DEFENSES.names())
def test_every_defense_default_is_the_one_params_yaml_ships(name):
    section = PARAMS["defense"][name]
    options = {p.name: p.default for p in list(inspect.signature(DEFENSES.get(name).__init__).parameters.values())[1:]}
    assert set(section) == set(options), f"defense.{name}: params.yaml and the constructor name different options"
    differing = {key: (options[key], section[key]) for key in options if _plain(options[key]) != section[key]}
    assert not differing, f"defense.{name}: code default != params.yaml: {differing}"


def test_the_pretrain_stage_falls_back_to_params_yaml_values():
    """Only the required keys given: every optional one falls back to what params.yaml ships."""
    from stages.params import Params
    from stages.pretrain import read_config

    shipped = PARAMS["pretrain"]
    required = {key: shipped[key] for key in ("method", "backbone", "width", "epochs", "batch_size", "lr")}
    config, extra = read_config(Params({"seed": 0, "target_class": 0, "pretrain": {**required, "simclr": shipped["simclr"]}}))
    assert (extra["min_scale"], extra["per_batch"]) == (shipped["augmentation"]["min_scale"], shipped["augmentation"]["per_batch"])
    assert (config.momentum, config.weight_decay, config.warmup_epochs, config.eval_every) == (
        shipped["momentum"], shipped["weight_decay"], shipped["warmup_epochs"], shipped["eval_every"])
    assert extra["eval_bank_size"] == shipped["eval_bank_size"]
