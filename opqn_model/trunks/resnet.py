"""SphereFace-20-style residual trunk, as used by the OPQN paper.

W. Liu et al., "SphereFace: Deep Hypersphere Embedding for Face Recognition",
CVPR 2017 (the 20-layer network); OPQN trains it from scratch at 32x32 and
112x112. Four stages of (strided 3x3 conv + residual 3x3 blocks) with
1, 2, 4, 1 blocks and 64 -> 512 channels, PReLU activations, then one FC layer
to a 512-d feature. BatchNorm after every conv (the OPQN code's variant)
keeps short CPU runs stable.

Pooling of the last feature map (`pooling`, facepq train --pooling):
    flat  the paper's: the map flattened into the FC layer (the default; checkpoints before pooling options)
    gap   global average pooling, then the FC layer
    rmac  R-MAC with learned whitening (opqn_model.trunks.rmac; Gordo et al. 2016): a unit descriptor of
          min(feature_dim, C) dims, C = the last stage's channels (width x 8); its whitening starts as the
          PCA-whitening of training region descriptors (`init_whitening`, called by training)
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn

from facepq_core.errors import ConfigError
from opqn_model.trunks import register_trunk
from opqn_model.trunks.inference import in_eval_batches, torch_features
from opqn_model.trunks.rmac import RMACPool

POOLINGS = ("flat", "gap", "rmac")


def conv_bn(cin: int, cout: int, stride: int, act_layer: type[nn.Module]) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), act_layer(cout))


class ResidualBlock(nn.Module):
    def __init__(self, channels: int, act_layer: type[nn.Module]):
        super().__init__()
        self.body = nn.Sequential(conv_bn(channels, channels, 1, act_layer), conv_bn(channels, channels, 1, act_layer))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class SphereResNet(nn.Module):
    """Residual face trunk.

    Args:
        blocks: residual blocks per stage (SphereFace-20: (1, 2, 4, 1)).
        width: channels of the first stage; stage i has width * 2**i (paper: 64 -> 512).
        input_size: side of the square RGB input (32 or 112; any multiple of 16 works).
        feature_dim: output feature length (512).
        act_layer: activation taking the channel count (PReLU).
        pooling: 'flat', 'gap' or 'rmac' (see the module docstring).
    Input: uint8 or float tensors [N, 3, S, S] (uint8 is scaled to [-1, 1]).
    Output: float32 [N, feature_dim].
    """

    trainable = True

    def __init__(self, blocks=(1, 2, 4, 1), width: int = 64, input_size: int = 32, feature_dim: int = 512,
                 act_layer: type[nn.Module] = nn.PReLU, name: str = "resnet20", pooling: str = "flat"):
        super().__init__()
        if input_size % 16:
            raise ValueError(f"input_size must be a multiple of 16, got {input_size}")
        if pooling not in POOLINGS:
            raise ConfigError(f"pooling must be one of {', '.join(POOLINGS)}, got {pooling!r}")
        self.name, self.input_size, self.feature_dim, self.pooling = name, input_size, feature_dim, pooling
        stages, cin = [], 3
        for i, n in enumerate(blocks):
            cout = width * 2**i
            stages.append(conv_bn(cin, cout, 2, act_layer))
            stages.extend(ResidualBlock(cout, act_layer) for _ in range(n))
            cin = cout
        self.stages = nn.Sequential(*stages)
        side = input_size // 16
        if pooling == "flat":
            self.fc = nn.Linear(cin * side * side, feature_dim)
        elif pooling == "gap":
            self.fc = nn.Linear(cin, feature_dim)
        else:
            self.feature_dim = min(feature_dim, cin)
            self.rmac = RMACPool(cin, self.feature_dim)

    def feature_map(self, images: torch.Tensor) -> torch.Tensor:
        """The last stage's map float32 [N, C, S/16, S/16]."""
        if images.dtype == torch.uint8:
            images = (images.float() - 127.5) / 128.0
        return self.stages(images)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        fmap = self.feature_map(images)
        if self.pooling == "flat":
            return self.fc(fmap.flatten(1))
        if self.pooling == "gap":
            return self.fc(fmap.mean(dim=(2, 3)))
        return self.rmac(fmap)

    @torch.no_grad()
    def init_whitening(self, crops: np.ndarray, batch_size: int = 256) -> int:
        """Start R-MAC's whitening as the PCA-whitening of the region descriptors of `crops` (uint8
        [N, S, S, 3], training photos) under the current weights; returns the regions used (0: not R-MAC)."""
        if self.pooling != "rmac" or not len(crops):
            return 0
        regions = in_eval_batches(self, crops, batch_size,
                                  lambda b: self.rmac.regions(self.feature_map(b)).flatten(0, 1).double().cpu())
        samples = torch.cat(regions).numpy()
        self.rmac.whiten.init_pca(samples)
        return len(samples)

    def features(self, crops: np.ndarray, batch_size: int = 256) -> np.ndarray:
        """Inference on aligned crops uint8 [N, S, S, 3] -> float32 [N, feature_dim]."""
        return torch_features(self, crops, batch_size)


@register_trunk
def resnet20(input_size: int = 32, width: int = 64, feature_dim: int = 512, pooling: str = "flat",
             **kwargs) -> SphereResNet:
    """SphereFace-20 layout: blocks (1, 2, 4, 1), 64 -> 512 channels, PReLU."""
    return SphereResNet(blocks=(1, 2, 4, 1), width=width, input_size=input_size, feature_dim=feature_dim,
                        name="resnet20", pooling=pooling, **kwargs)
