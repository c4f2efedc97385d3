"""Hash heads of DMH and DAGH: trunk features -> B real values whose signs are the code bits.

DMH (Pan 2020) hashes a trunk's last feature maps with a convolution followed by global
average pooling (no large fully connected layer). With a 1x1 convolution that is linear,
so it commutes with the average: conv1x1(GAP(F)) = GAP(conv1x1(F)). The trunks give
GAP(F) (opqn_model.trunks), and the head applies the 1x1 convolution to it as a
bias-free linear map after a non-affine BatchNorm (the centring takes the bias's place).
On the frozen dlib trunk the same head acts on the 128-d descriptor: a 1x1 convolution
of a 1x1 "map" of 128 channels.

Because the whole head is affine, it folds exactly into the product's binary codec
(facepq_core.codecs.binary): projection = W^T / std, mean = the BatchNorm's running mean,
no normalisation. The codec therefore takes the trunk's embedding like every other codec
(refinement tiers, feature caches and `enc.codec` on user embeddings keep working).

DAGH on a frozen trunk has no feature maps to attend to; its attention there is a
feature-channel gate on the (standardised) descriptor, a = sigmoid(W2 relu(W1 z + b1) + b2),
z <- a * z (`FeatureGate`), exported into the gated binary codec
(facepq_core.codecs.binary_gated). On trainable trunks DAGH's channel + spatial attention
acts on the maps inside the trunk (trunk `densenet_attention`).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn

from facepq_core.codecs.binary import BinaryCodec
from opqn_model.input_whitening import InputWhitening


class SignSTE(torch.autograd.Function):
    """Forward: exactly +-1 (+1 where x > 0, as the codec sets a bit); backward: the straight-through
    gradient (identity), so the loss on the discrete codes trains what produced them."""

    @staticmethod
    def forward(ctx, x):
        return torch.where(x > 0, torch.ones_like(x), -torch.ones_like(x))

    @staticmethod
    def backward(ctx, grad):
        return grad


def discrete_sign(x: torch.Tensor) -> torch.Tensor:
    """The discrete hash layer: float [N, B] -> exactly +-1 [N, B], straight-through gradient."""
    return SignSTE.apply(x)


class FeatureGate(nn.Module):
    """Feature-channel attention on a vector: [N, E] -> [N, E], z * sigmoid(W2 relu(W1 z + b1) + b2)."""

    def __init__(self, dim: int, reduction: int = 4):
        super().__init__()
        self.fc1 = nn.Linear(dim, max(4, dim // reduction))
        self.fc2 = nn.Linear(max(4, dim // reduction), dim)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return z * torch.sigmoid(self.fc2(torch.relu(self.fc1(z))))


class HashHead(nn.Module):
    """Trunk features float32 [N, in_dim] -> real hash values h float32 [N, bits] (bits = sign(h)).

    Args:
        in_dim: trunk feature length (channels of its last maps, or the descriptor length).
        bits: code length B (a multiple of 8).
        gate: a FeatureGate between the standardisation and the projection (DAGH on a frozen trunk).
        input_whitening: an InputWhitening (opqn_model.input_whitening) before the standardisation, or None;
            the rest of the head then takes its D-d output.
    """

    def __init__(self, in_dim: int, bits: int, gate: bool = False, input_whitening: InputWhitening | None = None):
        super().__init__()
        self.input_whitening = input_whitening  # a module only when given: unwhitened state dicts keep their keys
        if input_whitening is not None:
            in_dim = input_whitening.proj.out_features
        self.norm = nn.BatchNorm1d(in_dim, affine=False)
        self.gate = FeatureGate(in_dim) if gate else nn.Identity()
        self.proj = nn.Linear(in_dim, bits, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_whitening is not None:
            x = self.input_whitening(x)
        return self.proj(self.gate(self.norm(x)))

    @torch.no_grad()
    def init_statistics(self, features: np.ndarray) -> None:
        """Start the standardisation from the features' own mean and variance (a frozen trunk's are known);
        with an input whitening, start that as the features' PCA-whitening and standardise its output."""
        if self.input_whitening is not None:
            features = self.input_whitening.start(features)
        x = torch.as_tensor(np.asarray(features, np.float32))
        self.norm.running_mean.copy_(x.mean(0))
        self.norm.running_var.copy_(x.var(0, unbiased=True))

    @torch.no_grad()
    def export_codec(self, scoring: str = "hamming"):
        """The numpy codec computing these signs: BinaryCodec, or GatedBinaryCodec with a gate, scored by
        `scoring`; behind a WhitenedCodec when the head whitens its input."""
        codec = self._export_binary(scoring)
        return codec if self.input_whitening is None else self.input_whitening.export_codec(codec)

    @torch.no_grad()
    def _export_binary(self, scoring: str):
        std = torch.sqrt(self.norm.running_var + self.norm.eps).double().cpu()
        mean = self.norm.running_mean.double().cpu().numpy()
        weight = self.proj.weight.double().cpu()  # [B, E]
        if isinstance(self.gate, FeatureGate):
            from facepq_core.codecs.binary_gated import GatedBinaryCodec

            gate = [p.detach().cpu().numpy() for p in (self.gate.fc1.weight, self.gate.fc1.bias, self.gate.fc2.weight,
                                                        self.gate.fc2.bias)]
            return GatedBinaryCodec(weight.T.numpy(), mean, (1.0 / std).numpy(), *gate, scoring=scoring)
        return BinaryCodec((weight / std[None, :]).T.numpy(), mean, normalize=False, scoring=scoring)
