"""SphereFace-20-style residual trunk, as used by the OPQN paper.

W. Liu et al., "SphereFace: Deep Hypersphere Embedding for Face Recognition",
CVPR 2017 (the 20-layer network); OPQN trains it from scratch at 32x32 and
112x112. Four stages of (strided 3x3 conv + residual 3x3 blocks) with
1, 2, 4, 1 blocks and 64 -> 512 channels, PReLU activations, then one FC layer
to a 512-d feature. BatchNorm after every conv (the OPQN code's variant)
keeps short CPU runs stable.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn

from opqn_model.trunks import register_trunk
from opqn_model.trunks.inference import torch_features


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
    Input: uint8 or float tensors [N, 3, S, S] (uint8 is scaled to [-1, 1]).
    Output: float32 [N, feature_dim].
    """

    trainable = True

    def __init__(self, blocks=(1, 2, 4, 1), width: int = 64, input_size: int = 32, feature_dim: int = 512,
                 act_layer: type[nn.Module] = nn.PReLU, name: str = "resnet20"):
        super().__init__()
        if input_size % 16:
            raise ValueError(f"input_size must be a multiple of 16, got {input_size}")
        self.name, self.input_size, self.feature_dim = name, input_size, feature_dim
        stages, cin = [], 3
        for i, n in enumerate(blocks):
            cout = width * 2**i
            stages.append(conv_bn(cin, cout, 2, act_layer))
            stages.extend(ResidualBlock(cout, act_layer) for _ in range(n))
            cin = cout
        self.stages = nn.Sequential(*stages)
        side = input_size // 16
        self.fc = nn.Linear(cin * side * side, feature_dim)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype == torch.uint8:
            images = (images.float() - 127.5) / 128.0
        return self.fc(self.stages(images).flatten(1))

    def features(self, crops: np.ndarray, batch_size: int = 256) -> np.ndarray:
        """Inference on aligned crops uint8 [N, S, S, 3] -> float32 [N, feature_dim]."""
        return torch_features(self, crops, batch_size)


@register_trunk
def resnet20(input_size: int = 32, width: int = 64, feature_dim: int = 512, **kwargs) -> SphereResNet:
    """SphereFace-20 layout: blocks (1, 2, 4, 1), 64 -> 512 channels, PReLU."""
    return SphereResNet(blocks=(1, 2, 4, 1), width=width, input_size=input_size, feature_dim=feature_dim,
                        name="resnet20", **kwargs)
