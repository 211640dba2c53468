"""`cba validate`: check every section of params.yaml at once, before any stage does long work.

Each stage checks its own parameters again when it runs; this stage exists so that `dvc repro` fails in
seconds, with cba's one line, for a mistake that a later stage would otherwise meet only after the trigger
fit and the pretraining: a defense that does not exist (DVC's own message would be a missing
`cba/defenses/NAME.py`), or a bad value in a defense, finetune or analyze section. It writes a file whose
content never changes, so a passing check never makes a later stage rerun.
"""

from __future__ import annotations

from pathlib import Path

from cba.data import DATASETS
from cba.defenses import DEFENSES
from cba.errors import ConfigError
from cba.io import write_json
from cba.poison import MODES
from stages import analyze, finetune, pretrain
from stages.common import PARAMS_OPTION, check_outputs, defense_from_params, one_line_errors, trigger_from_params
from stages.params import Params

CHECKED = Path("data/params_checked.json")


def check_defenses(params: Params) -> list[str]:
    listed = params.raw("defenses", []) or []
    if not isinstance(listed, list) or not all(isinstance(name, str) for name in listed):
        raise ConfigError("defenses", listed, f"a list of defense names, from {', '.join(DEFENSES.names())}")
    for name in listed:
        DEFENSES.get(name, key="defenses")
        defense_from_params(params, name)
    return listed


@one_line_errors
def validate(params_path: Path = PARAMS_OPTION) -> None:
    """Check every section of params.yaml (no data is loaded); write data/params_checked.json."""
    params = Params.load(params_path)
    check_outputs(CHECKED.parent)
    params.integer("seed", 0, low=0, high=2**32 - 1)
    params.number("poison_rate", low=0.0, high=1.0)
    params.integer("target_class", low=0)
    params.choice("poison.mode", ("auto", *MODES), "auto")
    params.choice("data.name", DATASETS.names(), "synthetic")
    params.section("trigger", ["name", "params"])
    trigger_from_params(params, seed=0)
    pretrain.read_config(params)
    finetune.read_config(params)
    analyze.read_config(params)
    listed = check_defenses(params)
    write_json(CHECKED, {"checked": True})  # constant: a passing check never reruns a later stage
    print(f"params: every section checked ({len(listed)} defenses)")
