"""Losses of the two hashing methods (each returns a dict: 'loss' and its named parts, as OPQNLoss does).

DMHLoss (Pan 2020, "Deep Metric Hashing"): on u = tanh(h), float [N, B]
    L = CE(classifier(u), y) + center_weight * 1/2 mean_i ||u_i - c_{y_i}||^2 / B
                             + quant_weight * mean (|u| - 1)^2
softmax over the identities, a center loss (Wen et al., ECCV 2016) pulling each identity's
outputs to its learned center c_y, and a quantization loss pushing the outputs towards +-1
so sign(h) loses little.

DAGHLoss (Xiong et al., ICMR 2020, "discrete identity loss"): on b = sign(h), exactly +-1 [N, B]
with the straight-through gradient (opqn_model.hash_head.discrete_sign)
    L = CE(scale * classifier(b / sqrt(B)), y) + compact_weight * mean_{i != j, y_i = y_j} d_H(b_i, b_j) / B
an identity classifier on the binary codes themselves (separates identities in code space)
and an intra-identity compactness term: the mean normalised Hamming distance
d_H / B = (1 - b_i . b_j / B) / 2 between codes of the same person in the batch (pairs, not
learned centers: it needs no extra state and measures exactly what search ranks by).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class DMHLoss(nn.Module):
    """Args:
        bits: B; num_classes: training identities.
        center_weight, quant_weight: weights of the center and the quantization terms.
    """

    def __init__(self, bits: int, num_classes: int, center_weight: float = 0.1, quant_weight: float = 0.1):
        super().__init__()
        self.classifier = nn.Linear(bits, num_classes)
        self.centers = nn.Parameter(torch.zeros(num_classes, bits))
        self.center_weight, self.quant_weight = center_weight, quant_weight

    def forward(self, h: torch.Tensor, labels: torch.Tensor) -> dict:
        u = torch.tanh(h)
        ce = F.cross_entropy(self.classifier(u), labels)
        center = 0.5 * (u - self.centers[labels]).square().sum(1).mean() / u.shape[1]
        quant = (u.abs() - 1).square().mean()
        loss = ce + self.center_weight * center + self.quant_weight * quant
        return {"loss": loss, "ce": ce.detach(), "center": center.detach(), "quant": quant.detach()}


class DAGHLoss(nn.Module):
    """Args:
        bits: B; num_classes: training identities.
        compact_weight: weight of the intra-identity compactness term.
        scale: logit scale of the classifier on b / sqrt(B) (unit-length codes).
    """

    def __init__(self, bits: int, num_classes: int, compact_weight: float = 0.1, scale: float = 16.0):
        super().__init__()
        self.classifier = nn.Linear(bits, num_classes, bias=False)
        self.compact_weight, self.scale = compact_weight, scale

    def forward(self, b: torch.Tensor, labels: torch.Tensor) -> dict:
        bits = b.shape[1]
        ce = F.cross_entropy(self.scale * self.classifier(b / bits ** 0.5), labels)
        same = (labels[:, None] == labels[None, :]) & ~torch.eye(len(labels), dtype=torch.bool, device=b.device)
        if same.any():
            compact = ((1 - (b @ b.T) / bits) / 2)[same].mean()
        else:
            compact = b.new_zeros(())
        loss = ce + self.compact_weight * compact
        return {"loss": loss, "ce": ce.detach(), "compact": compact.detach()}
