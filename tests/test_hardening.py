"""Label-consistent hardening of poisons (cba.hardening): its budget, its seed, and what it lowers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cba.augment import build_augment
from cba.data import load_dataset
from cba.errors import ConfigError
from cba.hardening import harden, view_agreement
from cba.models import build_backbone
from cba.ssl import build_method
from cba.train import TrainConfig, train


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    return load_dataset("synthetic", "train", seed=0, train_size=64).images


@pytest.fixture(scope="module")
def encoder() -> torch.nn.Module:
    """A small SimCLR encoder, three epochs on 512 images (seconds): an untrained one reads every view of an
    image nearly alike, whatever the perturbation, and would give the fit nothing to lower."""
    data = load_dataset("synthetic", "train", seed=21, train_size=512)
    torch.manual_seed(0)
    method = build_method("simclr", build_backbone("convnet", width=16))
    train(method, data.images, data.labels, build_augment("ssl", 32, min_scale=0.5),
          TrainConfig(epochs=3, batch_size=128, lr=0.3, warmup_epochs=0, seed=0, eval_every=3), torch.device("cpu"),
          progress=False)
    return method.encoder.eval()


def mean_agreement(encoder: torch.nn.Module, images: np.ndarray, augment: torch.nn.Module) -> float:
    x = torch.as_tensor(images).permute(0, 3, 1, 2).float().div(255)
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(123)  # the same augmentation draws for every set of images compared
        return float(np.mean([view_agreement(encoder, x, augment).mean() for _ in range(8)]))


def test_random_hardening_moves_every_pixel_by_eps_unless_clipped_and_is_seeded(images):
    out = harden(images, None, 8, kind="random", seed=3)
    change = out.astype(int) - images.astype(int)
    assert np.abs(change).max() == 8
    inside = (images >= 8) & (images <= 247)  # pixels the clip cannot touch
    assert np.all(np.abs(change[inside]) == 8)
    assert np.array_equal(out, harden(images, None, 8, kind="random", seed=3))
    assert not np.array_equal(out, harden(images, None, 8, kind="random", seed=4))


def test_views_hardening_stays_in_budget_and_lowers_view_agreement_more_than_random(images, encoder):
    augment = build_augment("ssl", images.shape[1], min_scale=0.5)
    fitted = harden(images, encoder, 16, augment=augment, kind="views", steps=10, seed=0)
    assert np.abs(fitted.astype(int) - images.astype(int)).max() <= 16
    assert np.array_equal(fitted, harden(images, encoder, 16, augment=augment, kind="views", steps=10, seed=0))
    # An anchor given to `views` changes nothing: only `target` aims at it.
    anchor = torch.nn.functional.normalize(torch.ones(encoder(torch.zeros(1, 3, 32, 32)).shape[1]), dim=0)
    assert np.array_equal(fitted, harden(images, encoder, 16, augment=augment, kind="views", anchor=anchor,
                                         steps=10, seed=0))
    random = harden(images, None, 16, kind="random", seed=0)
    clean, aimed, blind = (mean_agreement(encoder, x, augment) for x in (images, fitted, random))
    # The fitted perturbation lowers the encoder's agreement of two views (fresh draws, not the fit's); one of
    # the same size with no aim does not (about 0.705, 0.677 and 0.707 here).
    assert aimed < blind - 0.01 and aimed < clean - 0.01


def test_target_hardening_moves_views_towards_the_anchor_more_than_random(images, encoder):
    from cba.hardening import class_centroid

    augment = build_augment("ssl", images.shape[1], min_scale=0.5)
    anchor = class_centroid(encoder, images[:16])
    fitted = harden(images[16:], encoder, 8, augment=augment, kind="target", anchor=anchor, steps=10, seed=0)
    assert np.abs(fitted.astype(int) - images[16:].astype(int)).max() <= 8

    def closeness(x: np.ndarray) -> float:
        return float(torch.nn.functional.cosine_similarity(
            encoder(torch.as_tensor(x).permute(0, 3, 1, 2).float().div(255)), anchor[None]).mean())

    with torch.no_grad():
        clean, aimed, blind = (closeness(x) for x in (images[16:], fitted, harden(images[16:], None, 8, kind="random")))
    assert aimed > blind and aimed > clean


@pytest.mark.parametrize("kwargs, key", [({"eps": 0}, "eps"), ({"eps": 300}, "eps"), ({"kind": "blur"}, "kind"),
                                         ({"steps": 0}, "steps"), ({"augment": None}, "encoder"),
                                         ({"kind": "target"}, "anchor")])
def test_bad_hardening_input_is_refused_by_name(images, encoder, kwargs, key):
    options = {"eps": 8, "augment": build_augment("ssl", 32), "kind": "views", "steps": 2, **kwargs}
    with pytest.raises(ConfigError) as raised:
        harden(images[:4], encoder, options.pop("eps"), **options)
    assert raised.value.key == key


def test_a_channels_last_encoder_fits_the_same_poisons_as_its_standard_copy(images, encoder):
    """A freshly trained surrogate is channels-last (as the fixture is) and a loaded one is not; both must fit the
    same poisons (without `standard_format`, 0.6% of these values differ)."""
    import copy

    augment = build_augment("ssl", images.shape[1], min_scale=0.5)
    assert next(encoder.parameters()).is_contiguous(memory_format=torch.channels_last)
    fresh = harden(images, encoder, 8, augment=augment, kind="views", steps=10, seed=0)
    loaded = copy.deepcopy(encoder).to(memory_format=torch.contiguous_format)
    assert np.array_equal(fresh, harden(images, loaded, 8, augment=augment, kind="views", steps=10, seed=0))
