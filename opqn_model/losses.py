"""OPQN loss: per-subspace CosFace on original and quantized sub-vectors, plus entropy.

L = 1/2 [mean_m CE(x_m) + mean_m CE(s_m)] + mu * mean_m H(p_m)

Each subspace has one L2-normalised identity classifier W_m shared by the
original branch x_m and the quantized branch s_m; logits are CosFace additive
margin logits s * (cos - margin * onehot) (H. Wang et al., CVPR 2018). The
entropy term pushes soft assignments towards one codeword so the hard code
used at index time loses little.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class SubspaceCosFace(nn.Module):
    """Additive-margin cosine logits, one normalised classifier per subspace.

    Args:
        M: subspaces; d: dims per subspace; num_classes: training identities.
        margin: additive cosine margin (paper 0.5); scale: logit scale (20 at 32x32, 40 at 112x112).
    """

    def __init__(self, M: int, d: int, num_classes: int, margin: float = 0.5, scale: float = 20.0):
        super().__init__()
        self.margin, self.scale = margin, scale
        self.weight = nn.Parameter(torch.empty(M, num_classes, d))
        nn.init.xavier_uniform_(self.weight)

    def forward(self, v: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """v [N, M, d], labels int64 [N] -> scaled margin logits [N, M, C]."""
        cosine = torch.einsum("nmd,mcd->nmc", F.normalize(v, dim=-1), F.normalize(self.weight, dim=-1))
        cosine = cosine.clamp(-1.0, 1.0)
        onehot = F.one_hot(labels, cosine.shape[-1]).to(cosine.dtype).unsqueeze(1)
        return self.scale * (cosine - self.margin * onehot)


class OPQNLoss(nn.Module):
    """The full OPQN objective; returns the total and its parts for logging.

    Args:
        M, d, num_classes, margin, scale: as SubspaceCosFace.
        entropy_weight: mu (paper 0.1).
    """

    def __init__(self, M: int, d: int, num_classes: int, margin: float = 0.5, scale: float = 20.0,
                 entropy_weight: float = 0.1):
        super().__init__()
        self.classifier = SubspaceCosFace(M, d, num_classes, margin, scale)
        self.entropy_weight = entropy_weight

    def forward(self, out: dict[str, torch.Tensor], labels: torch.Tensor) -> dict[str, torch.Tensor]:
        M = out["x"].shape[1]
        target = labels.repeat_interleave(M)
        logits_x = self.classifier(out["x"], labels)
        logits_s = self.classifier(out["s"], labels)
        ce_x = F.cross_entropy(logits_x.flatten(0, 1), target)
        ce_s = F.cross_entropy(logits_s.flatten(0, 1), target)
        p = out["p"]
        entropy = -(p * torch.log(p.clamp_min(1e-12))).sum(-1).mean()
        total = 0.5 * (ce_x + ce_s) + self.entropy_weight * entropy
        return {"loss": total, "ce_x": ce_x.detach(), "ce_s": ce_s.detach(), "entropy": entropy.detach()}
