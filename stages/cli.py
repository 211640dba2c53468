"""The `cba` console script: one sub-command per pipeline stage.

`cba <stage>` imports only that stage's module: every DVC stage is a fresh
process, and importing all of them (scikit-learn, SciPy, the defenses) would
cost each stage seconds it does not need.
"""

from __future__ import annotations

import importlib
import sys

import typer

STAGES = ("validate", "trigger", "poison", "pretrain", "reference", "finetune", "analyze", "defend", "report", "compare")
HELP = ("cba: backdoor attacks on contrastive self-supervised learning, as cached DVC stages.\n\n"
        "Stages run in order: validate -> trigger -> poison -> pretrain -> reference -> finetune -> analyze -> defend NAME (one per defense) -> report. "
        "Each reads params.yaml (override with --params) and writes the artifacts listed in the README. "
        "`cba compare` gathers DVC experiments into one table, mean ± std over seeds.")


def _print_version(value: bool) -> None:
    if value:
        from importlib.metadata import PackageNotFoundError, version

        try:
            print(f"cba {version('cba')}")
        except PackageNotFoundError:  # run from a source tree that was never installed
            from cba import __version__

            print(f"cba {__version__}")
        raise typer.Exit()


def build_app(names: tuple[str, ...] = STAGES) -> typer.Typer:
    """A Typer app with the named stages as sub-commands (imported now)."""
    app = typer.Typer(help=HELP, no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)

    @app.callback()
    def _group(version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                            help="Print cba's version and exit.")) -> None:
        """Keeps `cba <stage>` a sub-command even when one stage is loaded."""

    for name in names:
        app.command()(getattr(importlib.import_module(f"stages.{name}"), name))
    return app


def __getattr__(name: str) -> typer.Typer:
    # `stages.cli.app` (every stage) is built on first use, so that `main` can load just one.
    if name == "app":
        globals()["app"] = build_app()
        return globals()["app"]
    raise AttributeError(name)


def main() -> None:
    stage = sys.argv[1] if len(sys.argv) > 1 else None
    build_app((stage,) if stage in STAGES else STAGES)()


if __name__ == "__main__":
    main()
