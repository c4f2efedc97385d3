"""Method 'dagh': Deep Discrete Attention Guided Hashing (Xiong et al., ICMR 2020).

Attention: on a trainable trunk, the channel + spatial attention cascade of trunk
`densenet_attention` re-weights the feature maps after every dense block; on the frozen
dlib trunk (no maps) a feature-channel gate re-weights the standardised descriptor. Both
kinds of trunk end with that gate in the head (opqn_model.hash_head.FeatureGate), so the
codec is 'binary_gated'. The hash layer is discrete: forward exactly sign(h) (+-1), backward
the straight-through gradient. Loss: the discrete identity loss of opqn_model.hash_losses.DAGHLoss
(an identity classifier on the +-1 codes + the mean Hamming distance between same-identity
codes in a batch, weight --compact-weight).
"""
from __future__ import annotations

import torch

from facepq_core.errors import ConfigError
from opqn_model.hash_head import discrete_sign
from opqn_model.hash_losses import DAGHLoss
from opqn_model.methods import register_method
from opqn_model.methods.hashing import HashingMethod


@register_method
class DAGHMethod(HashingMethod):
    name = "dagh"
    codec_name = "binary_gated"
    gate = True

    def check_config(self, model_config, train_config, trunk) -> None:
        super().check_config(model_config, train_config, trunk)
        if getattr(trunk, "trainable", False) and not getattr(trunk, "attention", False):
            raise ConfigError(f"method dagh attends to a trainable trunk's feature maps: use --trunk "
                              f"densenet_attention (or the frozen --trunk dlib), not {model_config.trunk!r}")

    def make_loss(self, bits: int, num_classes: int, train_config) -> torch.nn.Module:
        return DAGHLoss(bits, num_classes, train_config.compact_weight)

    def loss_input(self, h: torch.Tensor) -> torch.Tensor:
        return discrete_sign(h)
