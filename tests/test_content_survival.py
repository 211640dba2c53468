"""What a view keeps of an image's own shape (cba.survival.content_kept), and the shape masks it reads."""

import hashlib
import json

import numpy as np
import pytest
import torch

from benches import load, refused
from cba.data.synthetic import generate, generate_with_factors, shape_masks
from cba.errors import ConfigError
from cba.survival import content_kept, content_summary, crop_windows


def block_mask(top: int, left: int, side: int, size: int = 32) -> np.ndarray:
    mask = np.zeros((1, size, size))
    mask[0, top:top + side, left:left + side] = 1
    return mask


def test_the_generator_still_draws_the_same_images():
    # Recorded before the masks were shared with content_kept: every cached victim and locked figure rests on
    # these bytes.
    digest = hashlib.sha256(generate(300, seed=11, chunk=128).images.tobytes()).hexdigest()
    assert digest == "ae5931a7e670552067c972c57cb75450f537cd43d77fb66824e1a90b109d1b9d"


def test_shape_masks_mark_the_pixels_drawn_in_the_foreground_colour():
    images, f = generate_with_factors(200, seed=4)
    masks = shape_masks(f["label"], f["theta"], f["radius"], f["centre"])
    assert masks.shape == (200, 32, 32) and masks.min() >= 0 and masks.max() <= 1
    pixels = images.images.astype(float) / 255
    inside = masks > 0.99
    colour = np.broadcast_to(f["foreground"][:, None, None, :], pixels.shape)
    # Inside a shape a pixel is its foreground colour plus the generator's noise (sigma 0.04).
    assert np.abs(pixels[inside] - colour[inside]).max() < 0.25
    assert np.median(np.abs(pixels[inside] - colour[inside])) < 0.05
    outside = masks < 0.01
    assert np.median(np.abs(pixels[outside] - colour[outside])) > 0.2  # the background is pushed away from it


def test_a_crop_of_half_the_image_or_more_always_keeps_the_centre_and_sometimes_loses_a_corner():
    centre = content_kept(block_mask(15, 15, 2), min_scale=0.5, draws=50, seed=0)
    assert torch.equal(centre, torch.ones_like(centre))
    corner = content_kept(block_mask(0, 0, 1), min_scale=0.5, draws=50, seed=0)
    assert set(corner.unique().tolist()) == {0.0, 1.0}  # a one-pixel shape is in a window or not
    assert 0 < float(corner.mean()) < 0.5  # a window must start at the very corner to hold it


def test_a_whole_image_shape_keeps_the_crops_area_and_everything_without_a_crop():
    whole = np.ones((3, 32, 32))
    torch.manual_seed(5)
    windows = crop_windows(32, 0.5, 3)
    torch.manual_seed(5)
    # content_kept's first view draws the same windows as crop_windows after the same seed.
    area = ((windows[:, 1] - windows[:, 0]) * (windows[:, 3] - windows[:, 2])).double() / 32**2
    kept = content_kept(whole, min_scale=0.5, draws=1, seed=5)
    assert torch.allclose(kept[:, 0], area)
    assert float(kept.min()) >= 0.45  # half the area, less kornia's rounding of the window's sides
    assert torch.equal(content_kept(whole, min_scale=1.0, draws=2, seed=0), torch.ones(3, 4, dtype=torch.float64))


def test_smaller_crops_lose_more_of_the_shape():
    _, f = generate_with_factors(300, seed=2)
    masks = shape_masks(f["label"], f["theta"], f["radius"], f["centre"])
    figures = [content_summary(content_kept(masks, scale, draws=4, seed=0)) for scale in (0.5, 0.2, 0.08)]
    kept = [fig["content_kept"] for fig in figures]
    split = [fig["split_pairs"] for fig in figures]
    assert kept[0] > kept[1] > kept[2] and split[0] < split[1] < split[2]


def test_content_kept_is_deterministic_from_the_seed_and_leaves_torch_rng_alone():
    mask = block_mask(3, 20, 6)
    state = torch.random.get_rng_state()
    first = content_kept(mask, 0.2, draws=8, seed=1)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert torch.equal(first, content_kept(mask, 0.2, draws=8, seed=1))
    assert not torch.equal(first, content_kept(mask, 0.2, draws=8, seed=2))


def test_content_summary_counts_views_and_split_pairs():
    kept = torch.tensor([[1.0, 0.2, 0.9, 0.8], [0.4, 0.1, 0.6, 0.45]])
    summary = content_summary(kept, threshold=0.5)
    assert summary["content_kept"] == pytest.approx(4.45 / 8)
    assert summary["views_below"] == pytest.approx(4 / 8)
    # pairs: (1.0, 0.2) split, (0.9, 0.8) not, (0.4, 0.1) both below, (0.6, 0.45) split
    assert summary["split_pairs"] == pytest.approx(2 / 4)


@pytest.mark.parametrize("masks, draws, key", [(np.zeros((2, 32, 32)), 1, "masks"), (np.ones((32, 32)), 1, "masks"),
                                               (np.ones((2, 32, 32)), 0, "draws")])
def test_bad_input_is_refused_naming_the_key(masks, draws, key):
    with pytest.raises(ConfigError, match=key):
        content_kept(masks, 0.5, draws=draws)


def test_bench_writes_the_table_for_the_target_and_every_class(tmp_path):
    bench = load("content_survival")
    out = tmp_path / "content.md"
    rows = bench.main(["--set", "data.options.train_size=200", "--min-scales", "0.5", "0.08", "--draws", "2",
                       "--out", str(out)])
    assert [(row["min_scale"], row["images"].split(" ")[0]) for row in rows] == [
        (0.5, "plus"), (0.5, "every"), (0.08, "plus"), (0.08, "every")]
    assert rows[0]["count"] == sum(generate_with_factors(200, 0)[1]["label"] == 4) and rows[1]["count"] == 200
    assert rows[2]["split_pairs_0.5"] > rows[0]["split_pairs_0.5"]
    text = out.read_text()
    assert "| 0.08 | every class (200) |" in text and "--min-scales 0.5 0.08 --draws 2" in text
    assert json.loads(out.with_suffix(".json").read_text())["rows"] == json.loads(json.dumps(rows))


@pytest.mark.parametrize("argv, message", [(["--set", "data.name=fashion_mnist"], "data.name='fashion_mnist'"),
                                           (["--min-scales", "1.5"], "--min-scales 1.5"),
                                           (["--draws", "0"], "--draws 0")])
def test_bench_refuses_bad_input_in_one_line_before_measuring(tmp_path, capsys, argv, message):
    bench = load("content_survival")
    out = tmp_path / "content.md"
    assert refused(bench.main, [*argv, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1 and not out.exists()
