"""A small four-block ConvNet: fast enough for CPU runs of the whole pipeline."""

from __future__ import annotations

from torch import nn

from cba.models.registry import BACKBONES, Normalize, StagedBackbone


def _block(cin: int, cout: int, pool: bool) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]
    if pool:
        layers.append(nn.MaxPool2d(2))
    return nn.Sequential(*layers)


class ConvNet(StagedBackbone):
    def __init__(self, width: int = 32):
        super().__init__()
        w = width
        self.normalize = Normalize()
        # Pool after every block: most compute stays at 16x16 and below, which
        # is what makes full pipeline runs fit in minutes on two CPU cores.
        self.stem = _block(3, w, pool=True)
        # `stages` keeps the naming shared with ResNet: stages[-1] is the last stage (Fine-Pruning prunes it).
        self.stages = nn.ModuleList([_block(w, 2 * w, True), _block(2 * w, 4 * w, True), _block(4 * w, 8 * w, False)])
        self.feature_dim = 8 * w


@BACKBONES.register("convnet")
def convnet(width: int = 32) -> ConvNet:
    return ConvNet(width)
