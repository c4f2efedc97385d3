"""Method 'itq': Iterative Quantization binary codes of a frozen trunk's embedding.

Gong & Lazebnik, "Iterative Quantization: A Procrustean Approach to Learning Binary
Codes", CVPR 2011. The L2-normalised, centred embeddings are projected on their top B
principal directions (V = X P) and rotated by an orthogonal R that minimises the
quantization loss ||sign(V R) - V R||: alternate B = sign(V R) and the orthogonal
Procrustes solution R = U W^T of V^T B = U S W^T. The codec is
`facepq_core.codecs.binary.BinaryCodec(P R, mean)`: B-bit codes scored by Hamming
distance through the query nodes' table kernel (a byte table per 8 bits).

Unsupervised and training-free apart from the fit: no epochs, no identities used, so
it is the baseline every learned code here is measured against (`facepq bench quality`).
Needs a frozen trunk (its embeddings exist before any training) and B <= the embedding
length. Validation people score the fit; model.pt is then fitted again with them included.
With ModelConfig.whitening = D (`--whitening D`) the codes are fitted to n(P (f - m)), the PCA-whitening
of the same embeddings to D dims, normalised (opqn_model.input_whitening; no gradient here, so it stays
the PCA), and the codec is 'whitened' around the binary one.
"""
from __future__ import annotations

import logging

import numpy as np

from facepq_core.codecs import codec_from_state
from facepq_core.codecs.binary import BinaryCodec
from facepq_core.errors import CheckpointError, ConfigError, DataError
from opqn_model.checkpoint import save_checkpoint
from opqn_model.input_whitening import make_input_whitening
from opqn_model.methods import register_method

log = logging.getLogger(__name__)


def fit_itq(embeddings: np.ndarray, bits: int, iterations: int = 50, seed: int = 0) -> BinaryCodec:
    """ITQ of float32 [N, E] embeddings -> a BinaryCodec of `bits` bits (a multiple of 8, <= E, < N)."""
    x = np.asarray(embeddings, dtype=np.float64)
    n, dim = x.shape
    if bits % 8 or not 8 <= bits <= dim:
        raise ConfigError(f"ITQ codes need bits a multiple of 8 between 8 and the embedding length {dim}, got {bits}")
    if n <= bits:
        raise DataError(f"fitting {bits}-bit ITQ codes needs more than {bits} training photos, got {n}")
    x /= np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    mean = x.mean(0)
    x -= mean
    # principal directions: eigenvectors of the covariance, largest first
    _, vectors = np.linalg.eigh(x.T @ x / n)
    pca = vectors[:, ::-1][:, :bits]
    v = x @ pca
    rng = np.random.default_rng(seed)
    rotation, _ = np.linalg.qr(rng.standard_normal((bits, bits)))
    for _ in range(iterations):
        b = np.where(v @ rotation >= 0, 1.0, -1.0)
        u, _, wt = np.linalg.svd(v.T @ b)
        rotation = u @ wt
    return BinaryCodec((pca @ rotation).astype(np.float32), mean.astype(np.float32), normalize=True)


@register_method
class ITQMethod:
    name = "itq"
    codec_name = "binary"

    # ---- checkpoints -------------------------------------------------------------------------------
    def proofs(self, model_config) -> dict:
        return {}

    def verify(self, payload: dict, model_config, path) -> None:
        state = payload.get("codec_state")
        if not isinstance(state, dict) or "projection" not in state:
            raise CheckpointError(f"{path}: an itq checkpoint must carry its codec state (projection, mean)")
        if tuple(state["projection"].shape[1:]) != (model_config.bits,):
            raise CheckpointError(f"{path}: itq projection {tuple(state['projection'].shape)} does not give the "
                                  f"{model_config.bits} bits its config says")

    def codec(self, payload: dict):
        return codec_from_state(payload["codec"], payload["codec_state"])  # binary, or binary whitened

    # ---- training ----------------------------------------------------------------------------------
    def check_config(self, model_config, train_config, trunk) -> None:
        if getattr(trunk, "trainable", False):
            raise ConfigError(f"method itq fits binary codes to a frozen trunk's embeddings; trunk "
                              f"{model_config.trunk!r} is trained end to end (use --trunk dlib, or --method opqn)")
        dim = model_config.whitening or trunk.feature_dim  # what the codes are fitted to
        if model_config.bits % 8 or not 8 <= model_config.bits <= dim:
            what = f"the whitened length {dim}" if model_config.whitening else f"the embedding length {dim}"
            raise ConfigError(f"itq codes need --bits a multiple of 8 up to {what}, got {model_config.bits}")

    @staticmethod
    def _fit(setup, with_val: bool = False):
        """ITQ of the fit embeddings; with ModelConfig.whitening, of their PCA-whitening (not trained: ITQ has
        no gradient), folded in front of the codes."""
        cfg, embeddings = setup.train_config, setup.fit_embeddings(with_val=with_val)
        whitening = make_input_whitening(embeddings.shape[1], setup.model_config.whitening)
        features = embeddings if whitening is None else whitening.start(embeddings)
        codec = fit_itq(features, setup.model_config.bits, cfg.itq_iterations, cfg.seed)
        return codec if whitening is None else whitening.export_codec(codec)

    def train(self, setup) -> dict:
        cfg = setup.train_config
        codec = self._fit(setup)
        val_map = setup.validation_map(codec)
        log.info("itq fit on %d embeddings: %d bits, validation code mAP %.4f", len(setup.inputs),
                 setup.model_config.bits, val_map)
        refit = len(setup.val_inputs) > 0
        if refit:  # as opqn's data start: more people give a better fit
            codec = self._fit(setup, with_val=True)
        model_path = setup.out_dir / "model.pt"
        metrics = {"epoch": 0, "val_map": val_map}
        fingerprint = save_checkpoint(model_path, setup.model_config, {}, {}, method=self.name,
                                      codec_state=codec.state(), **setup.checkpoint_extra(), epoch=0, step=0,
                                      best_map=val_map, metrics=metrics, refit_with_val_people=refit)
        return setup.summary(model_path, fingerprint, epochs=0, best_val_map=val_map, history=[metrics],
                             refit_with_val_people=refit)
