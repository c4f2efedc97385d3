"""Start the OPQN head as an (optimised) product quantizer of the training embeddings.

Why: with a frozen trunk and a few hundred training identities, the head trained
from a random start by the per-subspace identity loss learns codewords that are
prototypes of the *training* people; unseen people are quantized coarsely.
Measured on LFW (dlib trunk, validation people taken from the training people
only, 3 folds, 64 bits = 8x256): random init + OPQN loss 0.845-0.86 code mAP
whatever the regularisation; this data init 0.937, FAISS OPQ+PQ 0.917, float 0.968.

The init keeps the head's architecture (so checkpoints and the serving path are
unchanged) and sets its weights so that, in eval mode:

- both batch norms are the identity (their running stats are the data's and
  their affine parameters undo them);
- the linear layer maps a centred embedding f - mean to M chunks R_m (f - mean)
  of c = in_dim // M dims, R an orthonormal rotation learned by OPQ
  (Ge et al., CVPR 2013: alternate per-chunk k-means and an orthogonal
  Procrustes step), each chunk written into the first c of the d coordinates of
  its sub-vector (the rest zero). The rotation starts random, not from PCA: the
  head normalises every sub-vector, and PCA chunks of low-variance directions
  would blow noise up to full weight (chunk-normalised float mAP 0.61 vs 0.97);
- A_m holds the K centroids of a spherical k-means of the normalised chunks, so
  the code argmax_k x̂_m A_m is the nearest centroid in angle. With K = 256 they
  are numbered in nibble order (facepq_core.nibble_order: a relabelling, no code
  or score changes meaning), for which the AVX2 scan of 8-bit codes bounds a byte's
  table entry through its two nibbles tightly.

The fixed orthonormal codebooks C_m are untouched; training may go on from here
with the OPQN loss (best checkpoint chosen on validation people, epoch 0 included).
On LFW it does not help: 3 folds of training people, unseen mAP after 0 / 1 / 4
epochs (lr 0.1) 0.837/0.785/0.774 (32 bits), 0.898/0.858/0.841 (48), 0.932/0.886/0.871
(64); lower learning rates lose less but never gain. So the benchmark keeps the init
(0 epochs), fitted again with the validation people once they have done their job.
"""
from __future__ import annotations

import logging

import numpy as np
import torch
import torch.nn.functional as F

from facepq_core.errors import DataError
from facepq_core.nibble_order import nibble_order

log = logging.getLogger(__name__)


def kmeans(x: torch.Tensor, k: int, iters: int = 20, seed: int = 0, spherical: bool = False) -> torch.Tensor:
    """Lloyd k-means of x float32 [N, c] -> centroids [k, c] (unit norm when `spherical`, assignment by cosine).

    Empty clusters are re-seeded with random points, so all k centroids stay in use.
    """
    gen = torch.Generator().manual_seed(seed)
    n = x.shape[0]
    centroids = x[torch.randperm(n, generator=gen)[:k]].clone()
    for _ in range(iters):
        assign = (x @ centroids.T).argmax(1) if spherical else torch.cdist(x, centroids).argmin(1)
        sums = torch.zeros_like(centroids).index_add_(0, assign, x)
        counts = torch.bincount(assign, minlength=k).to(x.dtype)
        reseed = x[torch.randint(n, (k,), generator=gen)]
        centroids = torch.where((counts == 0)[:, None], reseed, sums / counts.clamp_min(1)[:, None])
        if spherical:
            centroids = F.normalize(centroids, dim=1)
    return centroids


def opq_rotation(x: torch.Tensor, M: int, c: int, K: int, iters: int = 30, seed: int = 0,
                 progress: bool = False) -> torch.Tensor:
    """OPQ rotation of centred, normalised x float32 [N, D] -> R float32 [M*c, D] with orthonormal rows.

    Chunk m of a vector is (R x)[m*c:(m+1)*c]. `progress`: a bar over the iterations (minutes on
    thousands of embeddings on a busy CPU).
    """
    from tqdm import tqdm

    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(x.shape[1], x.shape[1], generator=gen))
    rot = q[:, :M * c].T.contiguous()
    for it in tqdm(range(iters), desc="head: OPQ rotation", unit="iteration", disable=not progress, leave=False):
        z = x @ rot.T
        recon = torch.empty_like(z)
        for m in range(M):
            sl = slice(m * c, (m + 1) * c)
            cents = kmeans(z[:, sl], K, iters=5, seed=seed + it * M + m)
            recon[:, sl] = cents[torch.cdist(z[:, sl], cents).argmin(1)]
        # orthogonal Procrustes: the rotation that best maps x onto its quantized chunks
        u, _, vt = torch.linalg.svd(recon.T @ x, full_matrices=False)
        rot = u @ vt
    return rot


@torch.no_grad()
def init_head_from_features(head, features: np.ndarray, opq_iterations: int = 30, seed: int = 0,
                            progress: bool = False) -> None:
    """Set `head` (an OPQNHead) in place to the OPQ + spherical k-means quantizer of `features`.

    Parameters
    ----------
    head : OPQNHead. One that whitens its input (opqn_model.input_whitening) has the whitening started
        as the PCA-whitening of `features` too, and the quantizer is fitted to the whitened vectors.
    features : float32 [N, E] training embeddings of the frozen trunk. With fewer than K
        of them (a small gallery) min(N, K) codewords are fitted per subspace and the others
        repeat them: a repeated codeword never changes a code's score (log-softmax only
        shifts every entry of a subspace's table by the same amount), so small galleries
        train with the default code shape instead of failing.
    opq_iterations : OPQ alternations (0 keeps the random rotation).
    seed : seeds the rotation and the k-means.
    progress : progress bars (the OPQ iterations dominate the time).
    """
    M, K, d = head.M, head.K, head.d
    if head.input_whitening is not None:
        features = head.input_whitening.start(features)
    x = torch.as_tensor(np.asarray(features, dtype=np.float32))
    n, dim = x.shape
    if n < 2:
        raise DataError(f"initialising a head from data needs at least 2 training photos, got {n}")
    fitted = min(K, n)
    c = dim // M
    if c < 1 or c > d:
        raise DataError(f"cannot split {dim}-d embeddings into {M} chunks of at most d={d} dims")
    mean = x.mean(0)
    log.info("fitting the head to %d embeddings: OPQ rotation (%d iterations), then %d x %d spherical k-means",
             n, opq_iterations, M, fitted)
    rot = opq_rotation(F.normalize(x - mean, dim=1), M, c, fitted, opq_iterations, seed, progress)
    bn0, linear, bn1 = head.input_norm, head.linear, head.output_norm
    var0 = x.var(0, unbiased=False)
    bn0.running_mean.copy_(mean)
    bn0.running_var.copy_(var0)
    bn0.weight.copy_(torch.sqrt(var0 + bn0.eps))
    bn0.bias.copy_(mean)
    weight = torch.zeros(M * d, dim)
    for m in range(M):
        weight[m * d:m * d + c] = rot[m * c:(m + 1) * c]
    linear.weight.copy_(weight)
    linear.bias.copy_(-weight @ mean)
    y = (x - mean) @ weight.T
    var1 = y.var(0, unbiased=False)
    bn1.running_mean.zero_()
    bn1.running_var.copy_(var1)
    bn1.weight.copy_(torch.sqrt(var1 + bn1.eps))
    bn1.bias.zero_()
    assignment = torch.zeros(M, d, K)
    chunks = y.view(n, M, d)[:, :, :c]
    repeat = torch.arange(K) % fitted  # codeword k >= fitted repeats codeword k mod fitted
    for m in range(M):
        centroids = kmeans(F.normalize(chunks[:, m], dim=1), fitted, iters=25, seed=seed + m, spherical=True)
        if fitted == K == 256:  # number the codewords in nibble order: the AVX2 8-bit scan's bound is tight for it
            centroids = centroids[torch.as_tensor(nibble_order(centroids.numpy()))]
        assignment[m, :c] = centroids[repeat].T
    head.assignment.copy_(assignment)
    if fitted < K:
        log.info("small gallery: %d training embeddings fit %d of the %d codewords per subspace; the others "
                 "repeat them", n, fitted, K)
    log.info("head initialised from %d embeddings: OPQ rotation (%d iterations), %d x %d spherical k-means "
             "codewords on %d-d chunks", n, opq_iterations, M, fitted, c)
