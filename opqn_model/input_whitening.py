"""Learned whitening of a frozen trunk's embedding in front of a head (`facepq train --trunk dlib --whitening D`).

Gordo et al. (ECCV 2016) whiten R-MAC's region descriptors with a shift + fully connected layer started
as PCA-whitening and trained with the network (opqn_model.trunks.rmac.Whitening). The dlib trunk gives
a 128-d vector, not maps; here the same layer takes that vector and its output is L2-normalised:
    w(f) = n(P (f - m))    m [E], P [D, E]; started as m = mean, P = Λ^-1/2 Eᵀ of the top D eigenpairs
The normalisation is what makes this more than another linear map: the OPQN head (BatchNorm -> Linear)
and the DMH head (BatchNorm -> projection) start with affine maps, into which P (x - m) alone would fold
(a start, not a capability the head lacked); with it, every face reaches the head at unit length in the
whitened space, where the top D principal directions weigh the same (the re-weighting of Jégou & Chum,
ECCV 2012), which no affine map of the raw embedding does.

The heads (opqn_model.head.OPQNHead, opqn_model.hash_head.HashHead) hold it as an optional first
layer, so it trains with them, is saved in their state dicts (keys `input_whitening.*`) and folds into
the codec they export: facepq_core.codecs.whitened.WhitenedCodec around their own codec. A head's data
start (`start`) fits it to the embeddings it is given and returns what the rest of the head then sees.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from facepq_core.codecs.whitened import WhitenedCodec
from facepq_core.errors import ConfigError
from opqn_model.trunks.rmac import Whitening

STATE_PREFIX = "input_whitening."


class InputWhitening(Whitening):
    """Embeddings [N, E] -> n(P (x - m)) [N, D]: the R-MAC whitening layer followed by L2 normalisation."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(super().forward(x), dim=-1)

    @torch.no_grad()
    def start(self, features: np.ndarray) -> np.ndarray:
        """PCA-whitening of `features` float32 [N, E]; returns them whitened and normalised, float32 [N, D]."""
        self.init_pca(features)
        return self.apply(features)

    @torch.no_grad()
    def apply(self, features: np.ndarray) -> np.ndarray:
        """float32 [N, E] -> float32 [N, D] under the current weights (no gradient)."""
        x = torch.as_tensor(np.asarray(features, dtype=np.float32), device=self.shift.device)
        return self(x).cpu().numpy()

    @torch.no_grad()
    def export_codec(self, inner) -> WhitenedCodec:
        """`inner` (the codec of the whitened vectors) behind this whitening, in numpy."""
        return WhitenedCodec(self.shift.detach().cpu().numpy(), self.proj.weight.detach().cpu().numpy(), inner)

    @classmethod
    def from_state_dict(cls, state: dict) -> "InputWhitening | None":
        """An (unfitted) layer of the shape a head's saved state dict holds, or None when it has none."""
        weight = state.get(STATE_PREFIX + "proj.weight")
        return None if weight is None else cls(int(weight.shape[1]), int(weight.shape[0]))


def make_input_whitening(embedding_dim: int, out_dim: int) -> InputWhitening | None:
    """The layer for ModelConfig.whitening = `out_dim` (0: none)."""
    return InputWhitening(embedding_dim, out_dim) if out_dim else None


def check_whitening(model_config, trunk) -> None:
    """ConfigError unless ModelConfig.whitening is 0 (off) or 1..E on a frozen trunk's E-d embedding."""
    dim = int(model_config.whitening or 0)
    if not dim:
        return
    if getattr(trunk, "trainable", False):
        raise ConfigError(f"--whitening whitens a frozen trunk's embedding (--trunk dlib); trunk "
                          f"{model_config.trunk!r} trains end to end (its own whitening: --pooling rmac)")
    if not 1 <= dim <= trunk.feature_dim:
        raise ConfigError(f"--whitening takes 1..{trunk.feature_dim} dims (the {model_config.trunk} embedding's "
                          f"length), got {dim}")
