"""Inference of a torch trunk on aligned crops, shared by the trainable trunks' `features()` (and R-MAC's
whitening start, which reads the trunk's region descriptors the same way)."""
from __future__ import annotations

import numpy as np
import torch


@torch.no_grad()
def in_eval_batches(trunk: torch.nn.Module, crops: np.ndarray, batch_size: int, fn) -> list:
    """fn(batch) for each batch of crops uint8 [N, S, S, 3] as [b, 3, S, S] on the trunk's device, in eval mode
    (the previous mode restored after)."""
    was_training = trunk.training
    trunk.eval()
    device = next(trunk.parameters()).device
    out = []
    try:
        for i in range(0, len(crops), batch_size):
            batch = torch.from_numpy(np.ascontiguousarray(crops[i:i + batch_size])).permute(0, 3, 1, 2)
            out.append(fn(batch.to(device)))
    finally:
        trunk.train(was_training)
    return out


def torch_features(trunk: torch.nn.Module, crops: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """Aligned crops uint8 [N, S, S, 3] -> float32 [N, trunk.feature_dim], in eval mode (the mode is restored)."""
    out = in_eval_batches(trunk, crops, batch_size, lambda b: trunk(b).float().cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, trunk.feature_dim), np.float32)
