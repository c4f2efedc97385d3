"""DenseNet-style trunk for face crops (the trunk of DMH, Pan 2020), optionally with DAGH's attention cascade.

G. Huang et al., "Densely Connected Convolutional Networks", CVPR 2017: inside a dense
block every layer receives the concatenated feature maps of all earlier layers of the
block and adds `growth` new maps (BN-ReLU-conv1x1(4*growth)-BN-ReLU-conv3x3(growth));
transition layers between blocks (BN-ReLU-conv1x1 halving the channels, 2x2 average
pooling) shrink the maps. DMH ("Deep Metric Hashing for large-scale face image
retrieval", Pan 2020) hashes such a trunk's last feature maps with a convolution and
global average pooling (opqn_model.hash_head).

`densenet_attention` adds DAGH's multi-attention cascade (Xiong et al., "Deep Discrete
Attention Guided Hashing for Face Image Retrieval", ICMR 2020): after every dense block a
channel attention then a spatial attention module (CBAM form: Woo et al., ECCV 2018)
re-weight the maps, so the hash layer sees the discriminative face regions.

The trunk's feature vector is the global average of its last maps, float32 [N, channels];
the hash layer (a 1x1 convolution, which commutes with the average) is in the head.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn

from opqn_model.trunks import register_trunk
from opqn_model.trunks.inference import torch_features


class DenseLayer(nn.Module):
    """Bottleneck layer: [N, C, H, W] -> [N, C + growth, H, W] (its input concatenated with `growth` new maps)."""

    def __init__(self, channels: int, growth: int):
        super().__init__()
        self.body = nn.Sequential(nn.BatchNorm2d(channels), nn.ReLU(inplace=True),
                                  nn.Conv2d(channels, 4 * growth, 1, bias=False), nn.BatchNorm2d(4 * growth),
                                  nn.ReLU(inplace=True), nn.Conv2d(4 * growth, growth, 3, padding=1, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, self.body(x)], 1)


class Transition(nn.Module):
    """[N, C, H, W] -> [N, C // 2, H / 2, W / 2]."""

    def __init__(self, channels: int, out_channels: int):
        super().__init__()
        self.body = nn.Sequential(nn.BatchNorm2d(channels), nn.ReLU(inplace=True),
                                  nn.Conv2d(channels, out_channels, 1, bias=False), nn.AvgPool2d(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class ChannelSpatialAttention(nn.Module):
    """Channel attention, then spatial attention (CBAM); [N, C, H, W] -> same shape.

    channel: a_c = sigmoid(MLP(avgpool(x)) + MLP(maxpool(x))), x <- a_c * x;
    spatial: a_s = sigmoid(conv7x7([mean_c(x), max_c(x)])), x <- a_s * x.
    """

    def __init__(self, channels: int, reduction: int = 4):
        super().__init__()
        hidden = max(4, channels // reduction)
        self.mlp = nn.Sequential(nn.Conv2d(channels, hidden, 1), nn.ReLU(inplace=True), nn.Conv2d(hidden, channels, 1))
        self.spatial = nn.Conv2d(2, 1, 7, padding=3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        channel = torch.sigmoid(self.mlp(x.mean((2, 3), keepdim=True)) + self.mlp(x.amax((2, 3), keepdim=True)))
        x = x * channel
        spatial = torch.sigmoid(self.spatial(torch.cat([x.mean(1, keepdim=True), x.amax(1, keepdim=True)], 1)))
        return x * spatial


class DenseNet(nn.Module):
    """Dense blocks with transitions, for square RGB face crops.

    Args:
        blocks: dense layers per block (a transition follows every block but the last).
        growth: maps each dense layer adds.
        input_size: side of the square input (any multiple of 2**len(blocks)).
        attention: a ChannelSpatialAttention after every dense block (DAGH's cascade).
        name: registry name stored in checkpoints.
    Input: uint8 or float tensors [N, 3, S, S] (uint8 is scaled to [-1, 1]).
    Output: float32 [N, feature_dim], the global average of the last block's maps.
    """

    trainable = True

    def __init__(self, blocks=(4, 4, 4), growth: int = 16, input_size: int = 32, attention: bool = False,
                 name: str = "densenet"):
        super().__init__()
        if input_size % 2 ** len(blocks):
            raise ValueError(f"input_size must be a multiple of {2 ** len(blocks)}, got {input_size}")
        self.name, self.input_size, self.attention = name, input_size, attention
        channels = 2 * growth
        layers: list[nn.Module] = [nn.Conv2d(3, channels, 3, stride=2, padding=1, bias=False)]
        for i, n in enumerate(blocks):
            for _ in range(n):
                layers.append(DenseLayer(channels, growth))
                channels += growth
            if attention:
                layers.append(ChannelSpatialAttention(channels))
            if i < len(blocks) - 1:
                layers.append(Transition(channels, channels // 2))
                channels //= 2
        layers += [nn.BatchNorm2d(channels), nn.ReLU(inplace=True)]
        self.body = nn.Sequential(*layers)
        self.feature_dim = channels

    def feature_maps(self, images: torch.Tensor) -> torch.Tensor:
        """[N, 3, S, S] -> the last block's maps [N, feature_dim, S', S']."""
        if images.dtype == torch.uint8:
            images = (images.float() - 127.5) / 128.0
        return self.body(images)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.feature_maps(images).mean((2, 3))

    def features(self, crops: np.ndarray, batch_size: int = 256) -> np.ndarray:
        """Inference on aligned crops uint8 [N, S, S, 3] -> float32 [N, feature_dim]."""
        return torch_features(self, crops, batch_size)


@register_trunk
def densenet(input_size: int = 32, width: int = 64) -> DenseNet:
    """Three dense blocks of 4 layers, growth width // 4 (16 by default): 26 conv layers, 120 maps at the end."""
    return DenseNet(blocks=(4, 4, 4), growth=max(4, width // 4), input_size=input_size, name="densenet")


@register_trunk
def densenet_attention(input_size: int = 32, width: int = 64) -> DenseNet:
    """`densenet` with DAGH's channel + spatial attention after every dense block."""
    return DenseNet(blocks=(4, 4, 4), growth=max(4, width // 4), input_size=input_size, attention=True,
                    name="densenet_attention")
