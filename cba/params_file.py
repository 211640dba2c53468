"""A params.yaml file, read strictly (the stages' and the benches' one reader), and `--set KEY=VALUE` changes.

`--set` works as `dvc exp run -S` does on the pipeline: a dotted key into the
file's sections and a YAML value (`--set seed=1`, `--set data.name=fashion_mnist`,
`--set 'data.options={train_size: 10000, test_size: 2000}'`). So a variant of
the pipeline's settings is one command, without an edited copy of params.yaml,
and the bench's recorded command line says exactly what ran.

A misspelt key would silently add a setting that nothing reads, so a key the
file does not hold is refused when it looks like one it does hold, and a key
under a section the file lacks is refused outright.
"""

from __future__ import annotations

import argparse
import copy
import difflib
from pathlib import Path
from typing import Any, Iterable

import yaml

from cba.errors import ConfigError

# The sections and scalars params.yaml may hold at its top level.
TOP_LEVEL = ("seed", "poison_rate", "target_class", "data", "trigger", "poison", "pretrain", "finetune", "analyze",
             "defenses", "defense")
SET_FORM = "KEY=VALUE, a dotted key and a YAML value, e.g. seed=1 or data.name=fashion_mnist"


def closest(name: str, known: Iterable[str]) -> str:
    """', did you mean X?' for a likely typo, else ''."""
    match = difflib.get_close_matches(name, list(known), n=1)
    return f"; did you mean {match[0]}?" if match else ""


def check_top_level(key: str, value: Any) -> None:
    """A key params.yaml may hold at its top level, or one line naming the known ones."""
    if key not in TOP_LEVEL:
        raise ConfigError(key, value, f"not a known top-level key{closest(key, TOP_LEVEL)} (known: {', '.join(TOP_LEVEL)})")


class _StrictLoader(yaml.SafeLoader):
    """safe_load, but a key written twice in one mapping is an error instead of the last one winning."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[Any, int] = {}
        for key_node, value_node in node.value:
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if key in seen:
                raise ConfigError(str(key), self.construct_object(value_node, deep=True),
                                  f"a key set once per section, but lines {seen[key]} and {line} both set it")
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


def load_params_file(path: str | Path) -> dict[str, Any]:
    """The params file at `path` as a dict. A missing file, bad YAML, a key set twice in one section or an
    unknown top-level key is a ConfigError, in one line."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError("--params", str(path), "an existing params.yaml file")
    try:
        data = yaml.load(path.read_text(), Loader=_StrictLoader) or {}
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        raise ConfigError("--params", str(path), f"valid YAML ({where}{exc.problem or exc.context})") from None
    except yaml.YAMLError as exc:
        raise ConfigError("--params", str(path), f"valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise ConfigError("--params", str(path), "a YAML mapping of sections")
    for key in data:
        check_top_level(str(key), data[key])
    return data


def parse_set(text: str) -> tuple[list[str], Any]:
    """`a.b=value` as (['a', 'b'], the value read as YAML)."""
    key, sep, raw = text.partition("=")
    parts = key.strip().split(".")
    if not sep or not all(part.strip() for part in parts):
        raise ConfigError("--set", text, SET_FORM)
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError("--set", text, f"a YAML value after '=' ({str(exc).splitlines()[0]})") from None
    return [part.strip() for part in parts], value


def apply_sets(params: dict[str, Any], sets: Iterable[str]) -> dict[str, Any]:
    """A copy of `params` with every `KEY=VALUE` set, in order; `params` itself is left as it was."""
    result = copy.deepcopy(params)
    for text in sets:
        parts, value = parse_set(text)
        check_top_level(parts[0], value)
        node = result
        for depth, part in enumerate(parts[:-1]):
            where = ".".join(parts[:depth + 1])
            if part not in node:
                raise ConfigError(".".join(parts), value, f"a key under an existing section; the file has no {where}")
            if node[part] is None:  # an empty section (`options:`) takes keys
                node[part] = {}
            if not isinstance(node[part], dict):
                raise ConfigError(".".join(parts), value, f"a key under a section, but {where} is {node[part]!r}")
            node = node[part]
        leaf = parts[-1]
        look_alike = "" if leaf in node else closest(leaf, map(str, node))
        if look_alike:
            raise ConfigError(".".join(parts), value, f"a key the file holds{look_alike} "
                              "(a new key may not look like an existing one)")
        node[leaf] = value
    return result


def read_params(path: Path, sets: Iterable[str] = ()) -> dict[str, Any]:
    """The params file at `path` (`load_params_file`) with `sets` applied. Bad input is a ConfigError, in one line."""
    return apply_sets(load_params_file(path), sets)


def add_params_options(parser: argparse.ArgumentParser, default: Path, help: str = "the pipeline's settings") -> None:
    """`--params FILE` and repeatable `--set KEY=VALUE` on a bench's parser."""
    parser.add_argument("--params", type=Path, default=default, help=help)
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                        help="change one setting of --params, as `dvc exp run -S` does (repeatable), "
                             "e.g. --set seed=1 --set data.name=fashion_mnist")


def params_from_args(args: argparse.Namespace, parser: argparse.ArgumentParser | None = None) -> dict[str, Any]:
    """`args.params` read and `args.sets` applied. Bad input stops in one line, before any work: through
    `parser.error` where the parser is at hand, else as the exit message."""
    try:
        return read_params(args.params, args.sets)
    except ConfigError as err:
        if parser is not None:
            parser.error(str(err))
        raise SystemExit(str(err)) from None
