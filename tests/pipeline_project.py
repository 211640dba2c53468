"""A tiny copy of the pipeline in a throwaway git repository: what the end-to-end tests build and run."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
DEFENSES = ["spectral", "strip"]


def tiny_params() -> dict:
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["data"]["options"] = {"train_size": 400, "test_size": 120}
    params["pretrain"].update(epochs=2, width=4, batch_size=64, eval_every=1, eval_bank_size=200)
    params["finetune"]["linear"]["max_iter"] = 200
    params["analyze"].update(embedding="pca", max_points=200)
    params["defenses"] = DEFENSES
    # The learned trigger, at a size that fits in seconds: the stage still trains its surrogate and optimises.
    params["trigger"] = {"name": "optimized", "params": {"linf": 16, "surrogate_size": 200, "surrogate_epochs": 1,
                                                         "surrogate_width": 4, "rounds": 2, "trigger_steps": 3,
                                                         "batch_size": 32}}
    params.setdefault("defense", {})
    params["defense"]["strip"] = {**params["defense"].get("strip", {}), "max_inputs": 40, "n_overlays": 4}
    # Every defense at a size that runs in seconds: the pipeline repeats them in several tests.
    small = {"neural_cleanse": {"steps": 30, "clean_images": 60}, "dbd": {"ssl_epochs": 1, "semi_epochs": 1, "head_epochs": 10},
             "fine_pruning": {"finetune_epochs": 1, "clean_images": 100}, "abl": {"isolation_epochs": 1, "unlearn_epochs": 1},
             "downstream_ft": {"epochs": 1, "train_size": 200, "test_size": 60}}
    for name, changes in small.items():
        params["defense"][name] = {**params["defense"].get(name, {}), **changes}
    return params


def run(cmd: list[str], cwd: Path) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t", "DVC_NO_ANALYTICS": "1"}
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, f"{' '.join(cmd)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout + done.stderr


def ran_stages(output: str) -> set[str]:
    return set(re.findall(r"Running stage '([^']+)'", output))


def make_project(root: Path) -> Path:
    """A throwaway git and DVC repository at `root` with the pipeline's code and the tiny params, nothing run yet."""
    for folder in ("cba", "stages"):
        shutil.copytree(REPO / folder, root / folder, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "dvc.yaml", root / "dvc.yaml")
    shutil.copy(REPO / ".dvcignore", root / ".dvcignore")
    (root / "bench/results").mkdir(parents=True)  # the report shows the committed bench tables; a small stand-in here
    (root / "bench/results/defense_matrix.md").write_text("# Defense matrix\n\n## Attacks\n\n| defense | BadNets |\n|---|---|\n| strip | AUROC .95 |\n")
    shutil.copy(REPO / "bench/results/maturity_plus.md", root / "bench/results/maturity_plus.md")
    shutil.copy(REPO / "bench/results/maturity_plus.png", root / "bench/results/maturity_plus.png")  # a bench's figure
    (root / "params.yaml").write_text(yaml.safe_dump(tiny_params(), sort_keys=False))
    (root / ".gitignore").write_text("/data/\n__pycache__/\n")
    run(["git", "init", "-q"], root)
    run(["dvc", "init", "-q"], root)
    shutil.copytree(REPO / ".dvc/plots", root / ".dvc/plots")  # the plot template dvc.yaml names
    run(["git", "add", "-A"], root)
    run(["git", "commit", "-qm", "init"], root)
    return root
