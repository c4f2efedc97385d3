"""Method 'dmh': Deep Metric Hashing (Pan, "Deep Metric Hashing for large-scale face image retrieval", 2020).

A hash head (a 1x1 convolution + global average pooling, opqn_model.hash_head) on a trunk
(DMH's own is the DenseNet-style `densenet`; the frozen `dlib` descriptor works too), trained
with softmax over identities + center loss + quantization loss on tanh(h)
(opqn_model.hash_losses.DMHLoss; weights --center-weight, --quant-weight). Codes are sign(h),
B bits, in the 'binary' codec: Hamming distance, or the asymmetric score (real-valued query).
"""
from __future__ import annotations

import torch

from opqn_model.hash_losses import DMHLoss
from opqn_model.methods import register_method
from opqn_model.methods.hashing import HashingMethod


@register_method
class DMHMethod(HashingMethod):
    name = "dmh"
    codec_name = "binary"

    def make_loss(self, bits: int, num_classes: int, train_config) -> torch.nn.Module:
        return DMHLoss(bits, num_classes, train_config.center_weight, train_config.quant_weight)

    def loss_input(self, h: torch.Tensor) -> torch.Tensor:
        return h  # DMHLoss takes tanh itself
