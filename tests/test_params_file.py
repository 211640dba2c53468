"""`--set KEY=VALUE` on a bench's params file: what it changes, what it refuses, and that the file stays as it was."""

from __future__ import annotations

import argparse

import pytest
import yaml

from cba.errors import ConfigError
from cba.params_file import add_params_options, apply_sets, params_from_args, read_params

BASE = {"seed": 0, "poison_rate": 0.05,
        "data": {"name": "synthetic", "root": None, "options": {"train_size": 10000, "test_size": 2000}},
        "trigger": {"name": "optimized", "params": {"linf": 16, "w_neutral": 20.0}},
        "pretrain": {"epochs": 20, "augmentation": {"min_scale": 0.5}}, "finetune": {"knn": None}}


def test_sets_change_the_dotted_keys_with_yaml_values_and_leave_the_rest():
    before = yaml.safe_dump(BASE)
    got = apply_sets(BASE, ["seed=1", "data.name=fashion_mnist", "data.root=/usr/share/datasets/fashion-mnist",
                            "trigger.params.linf=24", "pretrain.augmentation.min_scale=0.2", "poison_rate=0.01"])
    assert got["seed"] == 1 and got["data"]["name"] == "fashion_mnist" and got["trigger"]["params"]["linf"] == 24
    assert got["data"]["root"] == "/usr/share/datasets/fashion-mnist" and got["pretrain"]["augmentation"]["min_scale"] == 0.2
    assert got["poison_rate"] == 0.01 and isinstance(got["trigger"]["params"]["linf"], int)
    assert got["data"]["options"] == BASE["data"]["options"] and got["trigger"]["params"]["w_neutral"] == 20.0
    assert yaml.safe_dump(BASE) == before  # the caller's dict is untouched


def test_a_mapping_value_replaces_a_section_and_later_sets_win():
    got = apply_sets(BASE, ["data.options={train_size: 300, test_size: 100}", "data.options.test_size=50", "seed=2",
                            "seed=3"])
    assert got["data"]["options"] == {"train_size": 300, "test_size": 50} and got["seed"] == 3


def test_new_keys_go_into_existing_and_empty_sections():
    got = apply_sets(BASE, ["data.options.download=true", "finetune.knn.k=50", "target_class=4"])
    assert got["data"]["options"]["download"] is True and got["finetune"]["knn"] == {"k": 50} and got["target_class"] == 4


@pytest.mark.parametrize("text, message", [
    ("seed", "--set='seed' is not valid: KEY=VALUE"),
    ("=3", "--set='=3' is not valid: KEY=VALUE"),
    ("data..name=x", "--set='data..name=x' is not valid: KEY=VALUE"),
    ("seed=[1", "--set='seed=[1' is not valid: a YAML value after '='"),
    ("seeed=1", "seeed=1 is not valid: not a known top-level key; did you mean seed?"),
    ("analyse.embedding=pca", "analyse='pca' is not valid: not a known top-level key; did you mean analyze?"),
    ("pretrain.simclr.temperature=0.5", "the file has no pretrain.simclr"),
    ("seed.value=1", "seed.value=1 is not valid: a key under a section, but seed is 0"),
    ("trigger.params.w_nuetral=5", "a key the file holds; did you mean w_neutral?"),
])
def test_bad_sets_are_refused_in_one_line_naming_the_value(text, message):
    with pytest.raises(ConfigError) as caught:
        apply_sets(BASE, [text])
    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_read_params_reads_the_file_and_refuses_a_missing_corrupt_or_non_mapping_one(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(BASE))
    assert read_params(path, ["seed=5"]) == {**BASE, "seed": 5}
    assert yaml.safe_load(path.read_text()) == BASE  # the file is never written
    for content, message in [(None, "an existing params.yaml file"), ("data: [unclosed", "valid YAML"),
                             ("- a list", "a YAML mapping of sections")]:
        if content is not None:
            path.write_text(content)
        with pytest.raises(ConfigError, match=message):
            read_params(path if content is not None else tmp_path / "absent.yaml")


def test_a_bench_parser_takes_repeated_sets_and_stops_on_a_bad_one_in_one_line(tmp_path, capsys):
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(BASE))
    parser = argparse.ArgumentParser()
    add_params_options(parser, path)
    args = parser.parse_args(["--set", "seed=7", "--set", "data.name=fashion_mnist"])
    assert args.sets == ["seed=7", "data.name=fashion_mnist"]
    assert params_from_args(args, parser)["data"]["name"] == "fashion_mnist"
    with pytest.raises(SystemExit):
        params_from_args(parser.parse_args(["--set", "sed=7"]), parser)
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith("sed=7 is not valid: not a known top-level key; "
                                                                     "did you mean seed? (known: seed, poison_rate, "
                                                                     "target_class, data, trigger, poison, pretrain, "
                                                                     "finetune, analyze, defenses, defense)")
    with pytest.raises(SystemExit, match="^seed.x=1 is not valid"):
        params_from_args(parser.parse_args(["--set", "seed.x=1"]))  # no parser: the message is the exit text
