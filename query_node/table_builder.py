"""The coordinator's per-query model work, embedding -> lookup table, as two numpy steps.

The OPQN head's query path (opqn_model.head.OPQNHead.lookup_tables) in eval mode is
BatchNorm -> Linear -> BatchNorm (dropout is off), per-subspace L2 normalisation,
logits sqrt(d) * x̂_m A_m and a log-softmax. The three affine layers fold into one
matrix and bias, so a query costs one [E] x [E, M*d] product, M small products and
a log-softmax, all in numpy loops that use no thread pool. Measured on the 2-vCPU
machine with the demo model (E=512, M=8, d=K=256) under other jobs' load:
0.6 ms p50 and no CPU used between queries, against 0.7 ms p50 / 5.2 ms p90
through torch with one thread (per-op overhead), while with more threads torch's
OpenMP workers, and numpy's OpenBLAS ones if the product went through BLAS, keep
spinning after each query on the cores the query nodes scan with.

The table is the head's: log-probabilities weighted per subspace by
w_m = |x_m| / mean_m' |x_m'| (the query's own sub-vector lengths; see
OPQNHead.lookup_tables, the one definition). At construction the folded path must
reproduce the head's own tables on a few random embeddings; a head of another shape,
or any mismatch, keeps the torch path (logged), so a change to the head's maths can
cost speed but never correctness. Tables agree to float32 rounding (about 1e-5).
"""
from __future__ import annotations

import logging

import numpy as np

log = logging.getLogger(__name__)

# Largest difference (in log-probability) from the head's own tables accepted at construction.
MATCH_TOLERANCE = 1e-3


class TableBuilder:
    """Embeddings -> lookup tables float32 [N, M, K], the same as `encoder.lookup_tables`.

    Args:
        encoder: opqn_model.api.FaceEncoder or HeadCodec (anything with `.codec.head` or `.head`
            and `lookup_tables`).
    Attributes:
        folded: True when the numpy path is in use, False when it fell back to the encoder's torch path.
    """

    def __init__(self, encoder):
        self.encoder = encoder
        self.folded = False
        head = getattr(getattr(encoder, "codec", encoder), "head", None)
        try:
            self.weight, self.bias, self.assignment, self.M, self.d = _fold(head)
        except (TypeError, ValueError, AttributeError) as exc:
            log.info("lookup tables through the model's torch path: %s", exc)
            return
        probe = np.random.default_rng(0).standard_normal((4, self.weight.shape[1])).astype(np.float32)
        want = np.asarray(encoder.lookup_tables(probe), np.float32)
        diff = float(np.abs(self._tables(probe) - want).max())
        if diff <= MATCH_TOLERANCE:
            self.folded = True
        else:
            log.warning("folded lookup tables differ from the model's by %.3g; using the model's torch path", diff)

    def _tables(self, embeddings: np.ndarray) -> np.ndarray:
        # einsum (no optimize) runs its own loops, not BLAS: numpy's OpenBLAS threads busy-wait after
        # every call, which measured as ~25 ms of a core burned per query, taken from the query nodes.
        z = (np.einsum("ne,oe->no", embeddings, self.weight) + self.bias).reshape(-1, self.M, self.d)
        # float64 norms: squares of large projections overflow float32 (the head's F.normalize, eps 1e-12).
        norms = np.sqrt(np.square(z, dtype=np.float64).sum(-1, keepdims=True))
        z = (z / np.maximum(norms, 1e-12)).astype(np.float32)
        logits = np.einsum("nmd,mdk->nmk", z, self.assignment)
        logits -= logits.max(-1, keepdims=True)
        tables = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
        tables *= (norms / np.maximum(norms.mean(axis=1, keepdims=True), 1e-12)).astype(np.float32)
        return tables.astype(np.float32)

    def __call__(self, embeddings: np.ndarray) -> np.ndarray:
        """float32 [N, E] (already validated: finite, E = the model's embedding_dim) -> float32 [N, M, K]."""
        if not self.folded:
            return np.asarray(self.encoder.lookup_tables(embeddings), dtype=np.float32)
        return self._tables(np.asarray(embeddings, dtype=np.float32))


def _fold(head):
    """(weight float32 [M*d, E], bias float32 [M*d], sqrt(d) * A float32 [M, d, K], M, d) of an eval-mode head.

    Raises:
        TypeError / ValueError / AttributeError: a head whose projection is not BN, dropout, Linear, BN in eval mode.
    """
    import torch
    from torch import nn

    if head is None or head.training:
        raise TypeError("no OPQN head in eval mode")
    layers = list(head.projection)
    kinds = (nn.BatchNorm1d, (nn.Dropout, nn.Identity), nn.Linear, nn.BatchNorm1d)
    if len(layers) != len(kinds) or not all(isinstance(layer, kind) for layer, kind in zip(layers, kinds)):
        raise TypeError(f"projection {[type(layer).__name__ for layer in layers]} is not BN, dropout, Linear, BN")
    bn1, _, linear, bn2 = layers
    if not (bn1.track_running_stats and bn2.track_running_stats):
        raise ValueError("batch norm without running statistics")
    with torch.no_grad():
        def affine(bn):
            scale = bn.weight.double() / torch.sqrt(bn.running_var.double() + bn.eps) if bn.affine else \
                1.0 / torch.sqrt(bn.running_var.double() + bn.eps)
            shift = (bn.bias.double() if bn.affine else 0.0) - bn.running_mean.double() * scale
            return scale, shift

        s1, t1 = affine(bn1)
        s2, t2 = affine(bn2)
        w = linear.weight.double()
        b = linear.bias.double() if linear.bias is not None else torch.zeros(w.shape[0], dtype=torch.float64)
        weight = (w * s1[None, :]) * s2[:, None]
        bias = (w @ t1 + b) * s2 + t2
        assignment = head.assignment.double() * head.logit_scale
    return (weight.float().numpy(), bias.float().numpy(), assignment.float().numpy().copy(), int(head.M),
            int(head.d))
