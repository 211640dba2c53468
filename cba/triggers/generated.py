"""A learned sample-specific trigger: x' = clip(x + linf * G(x)), G a small convolutional generator.

The universal learned trigger adds the same evidence to every image, and the
image's own content keeps deciding its class (docs/results/linear-probe.md). A generator,
as in BLTO (Sun et al. ICLR 2024), can shape each image's perturbation to its
content. It is fitted by the same bi-level objective as `optimized`
(`cba.triggers.optimize`); its weights are the trigger's tensors, saved as
safetensors like every trigger's.
"""

from __future__ import annotations

import numpy as np
import torch

from cba.triggers.fit_options import fit_defaults
from cba.triggers.optimized import OptimizedTrigger
from cba.triggers.perturbation import GeneratedPattern, PatternGenerator, apply_generator
from cba.triggers.registry import TRIGGERS


@TRIGGERS.register("generated")
class GeneratedTrigger(OptimizedTrigger):
    """x' = clip(x + linf * G(x)); |G| < 1, so the budget holds for every image."""

    form = "generator"
    # The universal pattern's options but its grid and signed steps; the generator's width and Adam rate.
    defaults = {"surrogate_size": "all", **fit_defaults(form)}

    def _generator(self) -> PatternGenerator:
        generator = PatternGenerator(self.params["hidden"])
        generator.load_state_dict({k: torch.from_numpy(v) for k, v in self._arrays.items()})
        return generator

    def _build(self, rng: np.random.Generator) -> dict[str, np.ndarray]:
        # The fit's starting generator (near-zero output): a function of the seed alone.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            generator = PatternGenerator(self.params["hidden"])
        return {k: v.detach().numpy().copy() for k, v in generator.state_dict().items()}

    def _adopt(self, perturbation: GeneratedPattern) -> None:
        self._arrays = {k: v.detach().cpu().numpy().copy() for k, v in perturbation.generator.state_dict().items()}

    def perturbation(self) -> np.ndarray:
        raise TypeError("the generated trigger has no single pattern: it perturbs each image differently "
                        "(use apply, or perturbations for a batch)")

    def perturbations(self, images: np.ndarray) -> np.ndarray:
        """The change `apply` makes to each image (rounded and clipped to 0-255), float32 (N, H, W, 3)."""
        images = self._check_images(images)
        return self._apply(images, None).astype(np.float32) - images.astype(np.float32)

    def _apply(self, images: np.ndarray, rng: np.random.Generator | None) -> np.ndarray:
        return apply_generator(self._generator(), images, self.params["linf"])
