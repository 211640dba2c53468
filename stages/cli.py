"""The `cba` console script: one sub-command per pipeline stage."""

from __future__ import annotations

import typer

from stages.analyze import analyze
from stages.defend import defend
from stages.finetune import finetune
from stages.poison import poison
from stages.pretrain import pretrain
from stages.report import report
from stages.trigger import trigger

app = typer.Typer(
    help="cba: backdoor attacks on contrastive self-supervised learning, as cached DVC stages.\n\n"
    "Stages run in order: trigger -> poison -> pretrain -> finetune -> analyze -> defend NAME (one per defense) -> report. "
    "Each reads params.yaml (override with --params) and writes the artifacts listed in the README.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
for command in (trigger, poison, pretrain, finetune, analyze, defend, report):
    app.command()(command)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
