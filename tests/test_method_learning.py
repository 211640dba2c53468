"""bench/method_learning.py: its variants do what they say, bad ones stop before training, and a run reads
the untrained encoder and the trained one as its table claims."""

from __future__ import annotations

import json

import pytest
import torch

from benches import load, refused

TINY = ["--set", "data.options.train_size=200", "--set", "data.options.test_size=60",
        "--set", "pretrain.width=4", "--bank-size", "100"]


@pytest.mark.parametrize("variant, named", [("{no_such_knob: 1}", "no_such_knob"), ("{colour: pink}", "colour"),
                                            ("[0.3]", "mapping")])
def test_a_bad_variant_is_one_line_before_any_training(capsys, variant, named):
    bench = load("method_learning")
    assert refused(bench.parse_args, ["--method", "byol", "--variants", "{}", variant]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and named in err


def test_an_unknown_method_is_refused(capsys):
    assert refused(load("method_learning").parse_args, ["--method", "dino"]) == 2
    assert "dino" in capsys.readouterr().err


def test_the_colour_variants_change_only_the_colour_steps():
    from cba.augment import build_augment

    bench = load("method_learning")
    augment = build_augment("ssl", 16, False, 0.5)
    gray = bench.with_colour(augment, "gray")
    torch.manual_seed(0)
    views = gray(torch.rand(8, 3, 16, 16))
    assert torch.allclose(views[:, 0], views[:, 1]) and torch.allclose(views[:, 1], views[:, 2])  # every view gray
    strong = bench.with_colour(augment, 2)
    assert strong[0] is augment[0] and strong[1] is augment[1] and strong[3] is augment[3]
    jitter, base = strong[2], augment[2]
    assert (float(base.brightness), float(base.hue)) == pytest.approx((0.4, 0.1))
    assert (float(jitter.brightness), float(jitter.contrast), float(jitter.saturation), float(jitter.hue)) == \
        pytest.approx((0.8, 0.8, 0.8, 0.2))


def test_predictor_gain_scales_only_the_predictors_gradients():
    from cba.attack import initial_backbone
    from cba.ssl import build_method

    bench = load("method_learning")
    torch.manual_seed(1)
    views = [torch.rand(6, 3, 16, 16), torch.rand(6, 3, 16, 16)]
    grads = []
    for gain in (None, 4.0):
        method = build_method("simsiam", initial_backbone("convnet", 4, 0), num_classes=10)
        if gain is not None:
            bench.scale_predictor_gradients(method, gain)
        method.loss(views, None)[0].backward()
        grads.append({name: p.grad.clone() for name, p in method.named_parameters() if p.grad is not None})
    plain, scaled = grads
    for name, grad in plain.items():
        expected = grad * 4 if name.startswith("predictor.") else grad
        assert torch.allclose(scaled[name], expected, atol=1e-6), name
    with pytest.raises(SystemExit, match="no predictor"):
        bench.scale_predictor_gradients(build_method("simclr", initial_backbone("convnet", 4, 0)), 2.0)


def test_a_run_reads_the_untrained_encoder_then_the_trained_one(tmp_path):
    out = tmp_path / "ml.md"
    result = load("method_learning").main(["--method", "simsiam", "--epochs", "2", "--every", "1", *TINY,
                                           "--variants", "{}", "{lr: 0.2, predictor_gain: 3}", "--out", str(out)])
    rows = json.loads(out.with_suffix(".json").read_text())["rows"]
    assert [r["variant"] for r in rows] == [{}, {"lr": 0.2, "predictor_gain": 3}]
    assert [r["lr"] for r in rows] == [0.3, 0.2]  # the method's own rate unless the variant names one
    for row in rows:
        assert [c["epoch"] for c in row["curves"]] == [0, 1, 2]
        assert row["curves"][0]["cosine_to_init"] == pytest.approx(1.0)  # epoch 0 is the untrained encoder
        assert row["curves"][-1]["cosine_to_init"] < 1  # and training turned it
        assert all(0 <= c["knn_acc"] <= 1 for c in row["curves"])
    assert rows[0]["curves"][0]["knn_acc"] == rows[1]["curves"][0]["knn_acc"]  # one seed: one starting encoder
    assert rows[0]["curves"][-1]["knn_acc"] != rows[1]["curves"][-1]["knn_acc"] or \
        rows[0]["curves"][-1]["loss"] != rows[1]["curves"][-1]["loss"]  # the variant changed the training
    assert result["rows"][1]["curves"][-1]["loss"] == rows[1]["curves"][-1]["loss"]
    assert "| `{lr: 0.2, predictor_gain: 3}` | 0.2 |" in out.read_text()
