"""`cba report`: gather params, metrics and plots into reports/report.md."""

from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd

from cba.errors import ConfigError
from cba.io import atomic_path, write_json
from cba.summary import summary_figures
from cba.verdicts import claim_verdicts
from cba.report import (analysis_section, attack_summary, bench_section, defense_table, params_block,
                        plot_learning_curves, trigger_summary)
from stages.common import (ANALYSIS_DIR, BENCH_DIR, METRICS_DIR, PARAMS_OPTION, PLOTS_DIR, REPORT_DIR, TRIGGER_DIR,
                           check_outputs, one_line_errors, read_details)
from stages.params import Params

BENCHES = (("trigger_survival", "Which part of each trigger survives the augmentations (bench/trigger_survival.py)"),
           ("content_survival", "What a view keeps of the image's own shape, at each crop scale "
                                "(bench/content_survival.py)"),
           ("trl_compare", "Methods side by side: claims 1 and 2 (bench/trl_compare.py)"),
           ("method_learning_simclr", "Does SimCLR learn the clean task at this budget: its recipe, read every 5 "
                                      "epochs (bench/method_learning.py)"),
           ("method_learning_byol", "Does BYOL learn it, and which knob of its recipe moves that "
                                    "(bench/method_learning.py)"),
           ("method_learning_simsiam", "Does SimSiam learn it, and which knob moves that (bench/method_learning.py)"),
           ("encoder_factors", "What each encoder keeps of the images' generative factors, and what the trigger "
                               "reads as (bench/encoder_factors.py)"),
           ("encoder_factors_rescale_avx2_seed0", "Shapes redrawn larger beside the trigger: a truly larger shape "
                                                  "is not the target (bench/encoder_factors.py --rescale)"),
           ("reader_floor", "What the readers get without pretraining: raw pixels and the untrained encoder "
                            "(bench/reader_floor.py)"),
           ("target_sweep", "The learned trigger aimed at each target class (bench/target_sweep.py)"),
           ("target_sweep_neutral", "The target the sweep found best, with the neutral term (bench/target_sweep.py)"),
           ("target_sweep_seed2", "The default attack on a third seed (bench/target_sweep.py)"),
           ("target_sweep_seed1_surrogate20", "Seed 1 with a surrogate warmed up as long as the victim trains "
                                              "(bench/target_sweep.py)"),
           ("target_sweep_surrogate20", "The default attack with a surrogate warmed up as long as the victim trains "
                                        "(bench/target_sweep.py)"),
           ("target_sweep_circle_neutral", "The default attack aimed at circle (bench/target_sweep.py)"),
           ("target_sweep_fashion", "The default attack on real data, Fashion-MNIST (bench/target_sweep.py)"),
           ("target_sweep_fashion_look", "Fashion-MNIST, aimed where the pattern's look lands (bench/target_sweep.py)"),
           ("reader_floor_fashion", "Fashion-MNIST: what the readers get from raw pixels and the untrained encoder "
                                    "(bench/reader_floor.py)"),
           ("maturity_default_h100", "The default pattern on victims trained 8 times longer, on a GPU: the probe's "
                                     "backdoor fades (bench/maturity.py)"),
           ("cross_target_avx2_seed0", "What the poisons bind: patterns refitted to aim at other classes, read on "
                                       "the committed run's two victims (bench/cross_target.py)"),
           ("poison_scale_avx2_seed0", "Stronger poisons, the same test-time trigger: the committed run's victim "
                                       "retrained with the pattern at L-inf 24 and 32 (bench/poison_scale.py)"),
           ("poison_scale_harden8_avx2_seed0", "Poisons hardened against their own content: the committed run's "
                                               "victim retrained with each poison's own L-inf 8 perturbation under "
                                               "its pattern (bench/poison_scale.py --harden)"),
           ("poison_scale_drop_target_avx2_seed0", "Without the clean target images: the committed run's "
                                                   "victim retrained on its poisoned set less every unpoisoned plus "
                                                   "image, and a victim without poisons on that set "
                                                   "(bench/poison_scale.py --drop)"),
           ("maturity_fashion", "Fashion-MNIST: the default attack read every 4 epochs (bench/maturity.py)"),
           ("maturity_fashion80", "Fashion-MNIST: the same victim trained for 80 epochs, read every 20 "
                                  "(bench/maturity.py)"),
           ("maturity_fashion_width32", "Fashion-MNIST: the poisoned victim at twice the width, read every 10 epochs "
                                        "(bench/maturity.py)"),
           ("maturity_fashion_byol", "Fashion-MNIST: a BYOL victim, poisoned beside clean, read every 5 epochs "
                                     "(bench/maturity.py)"),
           ("trigger_survival_fashion", "What survives the augmentations on Fashion-MNIST images "
                                        "(bench/trigger_survival.py)"),
           ("target_sweep_fashion_straight_through", "Fashion-MNIST with a straight-through clip in the fit "
                                                     "(bench/target_sweep.py)"),
           ("target_sweep_budget", "The default attack at larger budgets (bench/target_sweep.py)"),
           ("poison_dose", "The default pattern at five poison rates, beside the reference victim "
                           "(bench/target_sweep.py)"),
           ("hit_overlap_dose", "Which triggered images the poisons add: the pattern's pull and the poisons' push "
                                "(bench/hit_overlap.py)"),
           ("hit_overlap_neutral50", "The same split for a pattern fitted with w_neutral 50: less pull, still less "
                                     "push (bench/hit_overlap.py)"),
           ("hit_overlap_neutral5", "The same split for a pattern fitted with w_neutral 5 (bench/hit_overlap.py)"),
           ("poison_dose_seed1", "Seed 1 with every plus image poisoned (bench/target_sweep.py)"),
           ("poison_dose_seed2", "Seed 2 with every plus image poisoned (bench/target_sweep.py)"),
           ("poison_dose_fashion", "Fashion-MNIST: the default attack at 5% and with every coat poisoned "
                                   "(bench/target_sweep.py)"),
           ("budget_fashion", "Fashion-MNIST: the default attack at L-inf 48, 64 and 96 (bench/target_sweep.py)"),
           ("neutral_off_fashion", "Fashion-MNIST without the neutral term, at L-inf 16 and 48 "
                                   "(bench/target_sweep.py)"),
           ("target_sweep_resolution", "The default attack with smoother patterns (bench/target_sweep.py)"),
           ("target_sweep_poison_share", "The attacker's surrogate sees clean target images too "
                                         "(bench/target_sweep.py)"),
           ("readout_ceiling", "Each downstream reader's ceiling on the pipeline's encoder (bench/readout_ceiling.py)"),
           ("trigger_scale", "The pipeline's pattern at other test-time amplitudes, on the victim and the reference "
                             "(bench/trigger_scale.py)"),
           ("trigger_scale_seed1", "Seed 1: the pattern at other test-time amplitudes (bench/trigger_scale.py)"),
           ("trigger_scale_seed2", "Seed 2: the pattern at other test-time amplitudes (bench/trigger_scale.py)"),
           ("trigger_scale_fine_avx512", "A weaker copy of the pattern at test time, AVX-512, seed 0 "
                                         "(bench/trigger_scale.py)"),
           ("trigger_scale_fine_dose_avx512", "The same with every plus image poisoned, AVX-512, seed 0 "
                                              "(bench/trigger_scale.py)"),
           ("trigger_scale_fine_avx2", "A weaker copy of the pattern at test time, the committed AVX2 run "
                                       "(bench/trigger_scale.py)"),
           ("trigger_scale_fashion", "Fashion-MNIST: the pattern at other test-time amplitudes "
                                     "(bench/trigger_scale.py)"),
           ("target_sweep_fashion_min_scale02", "Fashion-MNIST with CTRL's smaller crop, min_scale 0.2 "
                                                "(bench/target_sweep.py)"),
           ("maturity_default_avx2", "The default backdoor as the encoder matures, 40 epochs, beside a victim without "
                                     "poisons (bench/maturity.py)"),
           ("maturity_plus", "The previous default's backdoor as the encoder matures, 40 epochs (bench/maturity.py)"),
           ("pull_push", "Every measured attack at once: what poisoning adds to the pattern's own pull "
                         "(bench/pull_push.py)"),
           ("pull_matrix_avx512", "Whose is the pull: every seed's pattern on every seed's reference encoder, AVX-512 "
                                  "(bench/pull_matrix.py)"),
           ("pull_matrix_poisoned_avx512", "Every seed's pattern on every seed's poisoned victim, AVX-512 "
                                           "(bench/pull_matrix.py)"),
           ("pull_matrix_avx2", "Whose is the pull on the AVX2 stream, five seeds (bench/pull_matrix.py)"),
           ("pull_matrix_poisoned_avx2", "Every seed's pattern on every seed's poisoned victim, AVX2 stream "
                                         "(bench/pull_matrix.py)"),
           ("pattern_parts_avx2", "Which part of the pattern the backdoor reads, five seeds, AVX2 stream "
                                  "(bench/pattern_parts.py)"),
           ("pattern_parts_avx512", "Which part of the pattern the backdoor reads, five seeds, AVX-512 "
                                    "(bench/pattern_parts.py)"),
           ("activation_pattern_avx2_seed0", "A test-time pattern fitted against the attacker's models, AVX2 stream, "
                                             "seed 0 (bench/activation_pattern.py)"),
           ("activation_pattern_avx2_seed3", "The same on seed 3: the probe's bars met, kNN's not "
                                             "(bench/activation_pattern.py)"),
           ("activation_pattern_avx512_seed0", "The same on AVX-512, seed 0 (the default on such a machine): every "
                                               "bar met from weight 20 (bench/activation_pattern.py)"),
           ("activation_pattern_five_clean_avx2_seed1",
            "Seed 1 with four more clean readers: the pull leaves the readers the fit sees, not the held-out victim "
            "(bench/activation_pattern.py)"),
           ("defense_matrix", "Defenses x attacks: claim 3 (bench/defense_matrix.py)"),
           ("test_pattern_defenses_avx512_seed0",
            "Claim 3 on the one attack that meets every bar: the pipeline's defenses with the fitted test-time "
            "pattern, AVX-512, seed 0 (bench/test_pattern_defenses.py)"))


@one_line_errors
def report(params_path: Path = PARAMS_OPTION) -> None:
    """Write reports/report.md (params, metrics, trigger preview, learning curves) and metrics/summary.json."""
    params = Params.load(params_path)
    check_outputs(REPORT_DIR, METRICS_DIR)
    poison, pretrain, finetune = (read_details(name) for name in ("poison", "pretrain", "finetune"))
    for name, record in (("poison", poison), ("pretrain", pretrain), ("finetune", finetune)):
        if not record:
            raise ConfigError("path", f"metrics/details/{name}.json",
                              f"the file does not exist; run `cba {name}` first")
    analysis = read_details("analysis")
    REPORT_DIR.mkdir(parents=True, exist_ok=True)
    _copy(TRIGGER_DIR / "preview.png", REPORT_DIR / "trigger_preview.png")
    test_preview = []  # the pattern the test inputs carry, where the attack fitted one after the poisons
    if (TRIGGER_DIR / "test_preview.png").exists():
        _copy(TRIGGER_DIR / "test_preview.png", REPORT_DIR / "trigger_test_preview.png")
        test_preview = ["The test-time pattern, on the same images.", "![test-time pattern](trigger_test_preview.png)"]
    plot_learning_curves(pd.read_csv(PLOTS_DIR / "pretrain_loss.csv"), pd.read_csv(PLOTS_DIR / "pretrain_knn.csv"),
                         REPORT_DIR / "learning_curves.png")
    analysis_parts = []
    if analysis:
        figures = {}
        for name, title in (("loss_groups", "per-sample loss by group"), ("loss_auroc", "loss AUROC and kNN curves"),
                            ("embedding", "t-SNE of training features")):
            if (ANALYSIS_DIR / f"{name}.png").exists():
                _copy(ANALYSIS_DIR / f"{name}.png", REPORT_DIR / f"analysis_{name}.png")
                figures[title] = f"analysis_{name}.png"
        analysis_parts = ["## Learning dynamics and feature entanglement",
                          "Claim 1 (entangled learning) and claim 2 (entangled features) of the paper, for this run.",
                          analysis_section(analysis, figures)]
    # Exactly this run's defenses: files of defenses dropped from `defenses:` may linger from earlier runs.
    listed = params.raw("defenses", []) or []
    defenses = [record for record in (read_details(f"defense/{name}") for name in listed) if record]
    defense_parts = []
    if defenses:
        defense_parts = ["## Defenses against this attack",
                         "Detection defenses: AUROC, and TPR/FPR/precision of the flagged set at the defense's own "
                         "threshold. Neural Cleanse: whether the true target class is flagged. Repairs: ACC and ASR "
                         "before → after.",
                         defense_table(defenses)]
    verdicts = claim_verdicts(finetune, analysis, defenses)
    parts = [
        "# cba report",
        "## Verdict",
        "\n".join(verdicts),
        "## Attack and result",
        attack_summary(poison, pretrain, finetune),
        "ASR counts triggered test images whose true class is not the target; ACC is on the clean test set.",
        "## Trigger",
        trigger_summary(read_details("trigger")),
        "Clean image, triggered image, and the amplified difference.",
        "![trigger preview](trigger_preview.png)",
        *test_preview,
        "## Learning curves",
        "![learning curves](learning_curves.png)",
        *analysis_parts,
        *defense_parts,
    ]
    bench = [(title, _bench_text(name)) for name, title in BENCHES if (BENCH_DIR / f"{name}.md").exists()]
    if bench:
        parts += ["## Benchmarks across methods and attacks",
                  f"**Not from this pipeline run.** These are the last committed outputs of the bench scripts "
                  f"(`{BENCH_DIR}/`): each bench trains its own victims, through the same attack record "
                  "(`cba.record.build_record`) as this run, at the settings its section names, and `dvc repro` "
                  "does not rerun them. Rerun a bench with the command in its section.",
                  *(bench_section(title, text) for title, text in bench)]
    parts += ["## Parameters", params_block(params.data)]
    with atomic_path(REPORT_DIR / "report.md") as tmp:
        tmp.write_text("\n\n".join(parts) + "\n")
    summary = summary_figures(finetune, defenses)
    write_json(METRICS_DIR / "summary.json", summary)
    headline = ", ".join(f"{key} {value:.3f}" for key, value in list(summary.items())[:6])
    print(f"report -> {REPORT_DIR / 'report.md'}; {headline}")


def _bench_text(name: str) -> str:
    """A bench's committed markdown, and its figure (copied beside the report) when it drew one."""
    text = (BENCH_DIR / f"{name}.md").read_text()
    figure = BENCH_DIR / f"{name}.png"
    if figure.exists():
        _copy(figure, REPORT_DIR / f"bench_{name}.png")
        text += f"\n\n![{name}](bench_{name}.png)\n"
    return text


def _copy(source: Path, dest: Path) -> None:
    with atomic_path(dest) as tmp:
        shutil.copyfile(source, tmp)
