"""The OPQN head: projection, soft assignment to fixed orthonormal codebooks, codes, lookup tables.

Paper: M. Zhang, X. Zhe, H. Yan, "Orthonormal Product Quantization Network for
Scalable Face Image Retrieval", Pattern Recognition 2023 (arXiv 2107.00327).

For a trunk feature f, the head projects x = BN(FC(Dropout(BN(f)))) in R^{M d},
splits it into M sub-vectors x_m, and soft-assigns each to the K fixed codewords
of C_m: p_m = softmax(x̂_m A_m), s_m = C_m p_m.

This module is the training side (torch, gradients). Codes and query tables of a
trained head come from `export_codec()`, a numpy codec (facepq_core.codecs.opqn) that
serving, ingest and evaluation share: one implementation of the eval-mode formulas.

One deliberate difference from the official code: the soft assignment uses the
L2-normalised sub-vector x̂_m during training as well, scaled by sqrt(d)
(the official code uses the raw, batch-normalised x_m there, whose norm is about
sqrt(d), but x̂_m when building a query's table). Using sqrt(d) x̂_m everywhere
makes the training-time p_m and the query-time lookup table the same function
and keeps the official code's logit magnitude (without the scale the softmax
starts uniform and the quantized branch never learns); codes (argmax) are
unchanged by the normalisation.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from facepq_core.codecs.opqn import OPQNCodec
from opqn_model.codebooks import orthonormal_codebooks
from opqn_model.input_whitening import InputWhitening


class OPQNHead(nn.Module):
    """Projection + soft product quantization over fixed orthonormal codebooks.

    Args:
        in_dim: trunk feature length (512 for resnet20, 128 for dlib).
        M: number of subspaces / codebooks.
        K: codewords per codebook (K <= d).
        d: dims per subspace; the projection outputs M * d.
        dropout: dropout probability inside the projection.
        assignment_init_scale: A_m starts as this times C_m. For a frozen trunk, training
            replaces this start by a product quantizer of the data (head_init.py).
        input_whitening: an InputWhitening (opqn_model.input_whitening) in front of the projection, or None;
            the projection then takes its D-d output instead of the `in_dim`-d embedding.
    """

    def __init__(self, in_dim: int, M: int, K: int, d: int, dropout: float = 0.2, assignment_init_scale: float = 4.0,
                 input_whitening: InputWhitening | None = None):
        super().__init__()
        self.M, self.K, self.d = M, K, d
        self.logit_scale = math.sqrt(d)
        self.input_whitening = input_whitening  # a module only when given: unwhitened state dicts keep their keys
        if input_whitening is not None:
            in_dim = input_whitening.proj.out_features
        self.projection = nn.Sequential(
            nn.BatchNorm1d(in_dim),
            nn.Dropout(dropout) if dropout > 0 else nn.Identity(),
            nn.Linear(in_dim, M * d),
            nn.BatchNorm1d(M * d),
        )
        self.register_buffer("codebooks", torch.from_numpy(orthonormal_codebooks(M, K, d)))  # [M, d, K]
        # A_m starts as a scaled copy of the codebook, so the first soft assignment is a
        # softmax over cosine similarities to the codewords (logit std ~ init_scale for a
        # random x). The official code's xavier init of the [M, d, K] tensor gives logits of
        # ~0.1: the softmax starts uniform and short runs never leave it.
        self.assignment = nn.Parameter(self.codebooks.clone() * assignment_init_scale)  # A_m, learned

    @classmethod
    def from_state_dict(cls, state: dict, model_config) -> "OPQNHead":
        """A head with the weights of `state` (a saved `state_dict()`) and the shape `model_config` resolves."""
        spec = model_config.code_spec()
        in_dim = int(state["projection.2.weight"].shape[1])  # the linear layer's input: the trunk embedding
        head = cls(in_dim, spec.M, spec.K, model_config.sub_dim, model_config.dropout,
                   input_whitening=InputWhitening.from_state_dict(state))
        head.load_state_dict(state)
        return head

    def project(self, features: torch.Tensor) -> torch.Tensor:
        """features [N, in_dim] -> sub-vectors x [N, M, d] (not normalised)."""
        if self.input_whitening is not None:
            features = self.input_whitening(features)
        return self.projection(features).view(-1, self.M, self.d)

    def assignment_logits(self, x: torch.Tensor) -> torch.Tensor:
        """x [N, M, d] -> logits sqrt(d) x̂_m A_m, [N, M, K]."""
        return torch.einsum("nmd,mdk->nmk", F.normalize(x, dim=-1) * self.logit_scale, self.assignment)

    def forward(self, features: torch.Tensor) -> dict[str, torch.Tensor]:
        """Training pass.

        Returns a dict with x [N, M, d] (projected sub-vectors), p [N, M, K] (soft
        assignment), s [N, M, d] (soft-quantized sub-vectors C_m p_m).
        """
        x = self.project(features)
        p = F.softmax(self.assignment_logits(x), dim=-1)
        s = torch.einsum("mdk,nmk->nmd", self.codebooks, p)
        return {"x": x, "p": p, "s": s}

    # The projection's layers by role. The state-dict keys (projection.0 ... projection.3) are the
    # checkpoint format, so the Sequential stays; only this class knows which index is which.
    @property
    def input_norm(self) -> nn.BatchNorm1d:
        return self.projection[0]

    @property
    def linear(self) -> nn.Linear:
        return self.projection[2]

    @property
    def output_norm(self) -> nn.BatchNorm1d:
        return self.projection[3]

    @property
    def in_dim(self) -> int:
        return self.linear.in_features

    @torch.no_grad()
    def export_codec(self):
        """The eval-mode head as a numpy codec: OPQNCodec, behind a WhitenedCodec when the head whitens its input."""
        codec = self._export_opqn()
        return codec if self.input_whitening is None else self.input_whitening.export_codec(codec)

    @torch.no_grad()
    def _export_opqn(self) -> OPQNCodec:
        """The eval-mode head as a numpy codec (`facepq_core.codecs.opqn`): the one implementation of
        codes and query tables that serving, ingest and evaluation use.

        In eval mode dropout is off and each batch norm is an affine map with its running
        statistics, so BN -> Linear -> BN folds into one matrix and bias (computed in float64,
        stored as float32); the assignment vectors are stored times sqrt(d).
        """
        def affine(bn: nn.BatchNorm1d):
            var = bn.running_var.double() + bn.eps
            scale = bn.weight.double() / torch.sqrt(var) if bn.affine else 1.0 / torch.sqrt(var)
            shift = (bn.bias.double() if bn.affine else 0.0) - bn.running_mean.double() * scale
            return scale, shift

        s1, t1 = affine(self.input_norm)
        s2, t2 = affine(self.output_norm)
        w = self.linear.weight.double()
        b = self.linear.bias.double() if self.linear.bias is not None else torch.zeros(w.shape[0], dtype=torch.float64)
        weight = (w * s1[None, :]) * s2[:, None]
        bias = (w @ t1 + b) * s2 + t2
        assignment = self.assignment.double() * self.logit_scale
        return OPQNCodec(weight.float().cpu().numpy(), bias.float().cpu().numpy(),
                         assignment.float().cpu().numpy(), self.M, self.K, self.d)
