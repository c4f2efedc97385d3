"""R-MAC pooling with learned whitening (Tolias, Sicre & Jégou, ICLR 2016; Gordo et al., ECCV 2016).

A convolutional trunk's last feature map [N, C, H, W] becomes one descriptor:
    regions  square windows on a multi-scale grid: at level l = 1..L the side is 2 min(H, W) / (l + 1),
             with l (+ extra along the longer side) windows per side spread evenly (about 40% overlap);
             plus the whole map (the MAC of the image)
    each     max-pooled over its window -> [C], L2-normalised, whitened (shift + linear: P (r - m))
    sum      over the regions, then L2-normalised -> [D]
The whitening is a learned layer (Gordo et al.'s shift + fully connected layer) initialised from the
PCA-whitening of training region descriptors (`Whitening.init_pca`): m their mean, P = Λ^-1/2 Eᵀ of the
top D eigenpairs of their covariance, so whitened training regions start with zero mean and identity
covariance; training then moves it with the rest of the network. D <= C (a PCA of C-d vectors).
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

RMAC_LEVELS = 3
OVERLAP = 0.4
PCA_EPS = 1e-6  # added to the eigenvalues: rank-deficient samples must not divide by zero


def rmac_regions(height: int, width: int, levels: int = RMAC_LEVELS) -> list[tuple[int, int, int]]:
    """The R-MAC windows of an H x W map: (top, left, side) each, the whole-map window (its MAC) first.

    The grid of Tolias et al. (their reference code): the side at level l is floor(2 min(H, W) / (l + 1));
    the longer dimension gets the number of extra windows whose overlap is closest to 40%.
    """
    short = min(height, width)
    extra_h = extra_w = 0
    if height != width:
        steps = np.arange(2, 8)
        gap = (max(height, width) - short) / (steps - 1)
        best = int(np.argmin(np.abs((short ** 2 - short * gap) / short ** 2 - OVERLAP)))
        if height < width:
            extra_w = best + 1
        else:
            extra_h = best + 1
    out = [(0, 0, -1)]  # -1: the whole map (H x W, not square)
    for level in range(1, levels + 1):
        side = math.floor(2 * short / (level + 1))
        if side < 1:
            continue
        tops = _starts(height, side, level + extra_h)
        lefts = _starts(width, side, level + extra_w)
        out.extend((t, l, side) for t in tops for l in lefts)
    return out


def _starts(length: int, side: int, count: int) -> list[int]:
    """`count` window starts spread evenly over [0, length - side] (one window: at 0)."""
    if count <= 1 or length <= side:
        return [0]
    step = (length - side) / (count - 1)
    return sorted({math.floor(i * step) for i in range(count)})


class Whitening(nn.Module):
    """Shift + linear layer: x [.., C] -> P (x - m) [.., D], learned; `init_pca` starts it as PCA-whitening."""

    def __init__(self, channels: int, out_dim: int):
        super().__init__()
        if out_dim > channels:
            raise ValueError(f"whitening maps {channels} dims to at most {channels}, asked for {out_dim}")
        self.shift = nn.Parameter(torch.zeros(channels))
        self.proj = nn.Linear(channels, out_dim, bias=False)
        with torch.no_grad():
            self.proj.weight.copy_(torch.eye(out_dim, channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x - self.shift)

    @torch.no_grad()
    def init_pca(self, samples: np.ndarray | torch.Tensor) -> None:
        """Set m = mean and P = Λ^-1/2 Eᵀ (top out_dim eigenpairs of the covariance) of samples [n, C]."""
        x = torch.as_tensor(np.asarray(samples, dtype=np.float64))
        mean = x.mean(0)
        centred = x - mean
        cov = centred.T @ centred / max(len(x), 1)
        vals, vecs = torch.linalg.eigh(cov)  # ascending
        order = torch.argsort(vals, descending=True)[: self.proj.out_features]
        proj = (vecs[:, order] / torch.sqrt(vals[order].clamp_min(0) + PCA_EPS)).T  # [D, C]
        self.shift.copy_(mean.float())
        self.proj.weight.copy_(proj.float())


class RMACPool(nn.Module):
    """R-MAC of a feature map with learned whitening: [N, C, H, W] -> unit descriptors [N, out_dim]."""

    def __init__(self, channels: int, out_dim: int, levels: int = RMAC_LEVELS):
        super().__init__()
        self.levels = levels
        self.whiten = Whitening(channels, out_dim)

    def regions(self, fmap: torch.Tensor) -> torch.Tensor:
        """Each window max-pooled and L2-normalised: [N, R, C] (before whitening)."""
        _, _, h, w = fmap.shape
        pooled = []
        for top, left, side in rmac_regions(h, w, self.levels):
            window = fmap if side < 0 else fmap[:, :, top:top + side, left:left + side]
            pooled.append(window.amax(dim=(2, 3)))
        return F.normalize(torch.stack(pooled, dim=1), dim=-1)

    def forward(self, fmap: torch.Tensor) -> torch.Tensor:
        whitened = F.normalize(self.whiten(self.regions(fmap)), dim=-1)
        return F.normalize(whitened.sum(dim=1), dim=-1)
