"""Model and training configuration: every default in one place.

An experiment overrides only what it changes (CLI flags map 1:1 to fields);
the whole config is logged at the start of training and stored in checkpoints.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from facepq_core.codes import CodeSpec, resolve_code_spec
from facepq_core.errors import ConfigError


@dataclass
class ModelConfig:
    """What defines a model's codes: two models with equal configs and weights give equal codes.

    Args:
        trunk: registry name ('resnet20' trained end to end, 'dlib' frozen pretrained).
        bits: code length; (M, K) are resolved from it unless given.
        M, K: codebooks and codewords per codebook (optional overrides).
        sub_dim: d, dims per subspace; defaults to K (the paper's 112x112 rule D = M*K),
            at least 32 so small K still gets a usable projection.
        input_size: side of the aligned face crop the trunk takes.
        trunk_width: base channels of resnet20 (64 in the paper; smaller trains faster on CPU).
        pooling: how a convolutional trunk pools its last feature map: flat (the paper's flatten + FC),
            gap (global average) or rmac (R-MAC regions with learned whitening, Gordo et al. 2016).
        dropout: dropout in the head's projection (BN -> dropout -> FC -> BN).
        whitening: frozen trunk (dlib) only: D > 0 puts a learned whitening in front of the head,
            n(P (f - m)) with D dims out (1..128 for dlib): a shift + linear layer started as the
            PCA-whitening of the training embeddings, then L2-normalised; trained with the head
            (opqn, dmh, dagh), kept at its PCA start by itq; folded into the codec ('whitened').
            0 (the default; leave the flag out): none.
        pipeline: FacePipeline settings (FacePipeline.to_dict()), stored so encoding
            aligns faces exactly as training did.
    """

    trunk: str = "resnet20"
    bits: int = 64
    M: int | None = None
    K: int | None = None
    sub_dim: int | None = None
    input_size: int = 32
    trunk_width: int = 64
    pooling: str = "flat"
    dropout: float = 0.2
    whitening: int = 0
    pipeline: dict = field(default_factory=dict)

    def code_spec(self) -> CodeSpec:
        return resolve_code_spec(self.bits, self.M, self.K, self.sub_dim)

    @property
    def d(self) -> int:
        spec = self.code_spec()
        return self.sub_dim if self.sub_dim else max(spec.K, 32)

    @property
    def head_dim(self) -> int:
        return self.code_spec().M * self.d

    def resolved(self) -> "ModelConfig":
        """A copy with M, K and sub_dim filled in, as stored in checkpoints."""
        spec = self.code_spec()
        return dataclasses.replace(self, M=spec.M, K=spec.K, sub_dim=self.d)

    def to_dict(self) -> dict:
        """The fields; those added after checkpoints existed are left out at their defaults, so the
        fingerprints (which hash this dict) of earlier checkpoints still verify."""
        out = dataclasses.asdict(self)
        for name, default in _LATER_FIELDS.items():
            if out.get(name) == default:
                del out[name]
        return out

    @classmethod
    def from_dict(cls, data: dict) -> "ModelConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


_LATER_FIELDS = {"pooling": "flat", "whitening": 0}


@dataclass
class TrainConfig:
    """Optimisation settings (paper: SGD lr 0.1, momentum 0.9, wd 5e-4, batch 256).

    Args:
        method: training method (opqn_model.methods): 'opqn' (the OPQN head) or 'itq' (binary
            codes of a frozen trunk's embedding, Hamming distance).
        epochs: passes over the training photos; None = 20 for a trainable trunk, 0 for a frozen
            one (opqn: its head starts as a product quantizer of the training embeddings and, with
            a few hundred training people, the OPQN loss after that lowers unseen-people mAP;
            see README).
        batch_size: photos per training step.
        lr, momentum, weight_decay: SGD settings (cosine schedule after a warm-up of at most one epoch).
        margin, scale: CosFace additive margin and scale (paper: 0.5; scale None = 20 at 32x32, 40 at 112x112).
        entropy_weight: mu, weight of the mean soft-assignment entropy.
        seed: seeds the split, the initialisation and the batch order.
        test_people: fraction of people held out of training for the unseen protocol.
        queries_per_person: photos per training person held out as seen-protocol queries.
        val_people: fraction of training people used to pick the best checkpoint (unseen mAP).
        device: 'auto' (a GPU when one is visible), 'cpu' or 'cuda[:n]'. The same code
            path trains on either; checkpoints are device-independent.
        head_init: 'data' starts the head of a frozen trunk as an OPQ + spherical k-means
            quantizer of the training embeddings (head_init.py; LFW unseen mAP at 64 bits
            0.85 -> 0.94 on validation people); 'random' is the paper's start. A trainable
            trunk always starts random (its features do not exist before training).
        head_refit: 'data' replaces the trained head of a trainable trunk, after training, with the
            OPQ + spherical k-means quantizer of the best epoch's trunk embeddings (training and
            validation people; how a frozen trunk's head starts). The trained head's codewords act
            as prototypes of the training people, so unseen people who resemble the same one share
            a code (the demo's 40 unseen people: 274 distinct codes for 351 faces, 6 of 39 queries
            tied with another person at rank 1, code mAP 0.568 / float 0.648; refitted: 350 codes,
            no ties, 0.648). Not put to a validation vote: the validation people picked the epoch
            by the trained head's score, which makes that score optimistic (demo: 0.795 against
            0.730 for the refit scored once) while unseen people say the opposite. 'off' keeps
            the trained head.
        opq_iterations: OPQ alternations of the data init (30: 10 gave 0.910, 30 0.937,
            50 0.928 on validation at 64 bits; the k-means seed matters as much beyond 30).
        itq_iterations: rotation updates of method itq (Gong & Lazebnik use 50).
        refine_bits: bits of the refinement codes fitted with the model (a product quantizer of the
            same embeddings, BITS / 8 bytes a face), which an index created with --refine codes:BITS
            stores beside its first-pass codes to re-score search candidates; 0 fits none; None = 256
            (32 bytes) when the embedding splits into 32 equal chunks (dlib's 128-d, resnet20's 512-d), else none.
        center_weight, quant_weight: method dmh: weights of the center loss and the quantization loss.
        scoring: methods dmh and dagh: how search scores their binary codes, 'hamming' (the query's own
            bits; the nodes' popcount kernel) or 'asymmetric' (the query's real values against the gallery's
            bits; table kernel). Stored in the model's codec: the stored codes are the same either way.
        compact_weight: method dagh: weight of the intra-identity Hamming compactness term (LFW validation
            people, dlib, 64 bits, best epoch's code mAP: 0.780 at 1.0 over 20 epochs; 0.928 at 0.1, 0.925 at
            0.01, 0.916 at 0 over 10 epochs).
    """

    method: str = "opqn"
    epochs: int | None = None
    batch_size: int = 256
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    margin: float = 0.5
    scale: float | None = None
    entropy_weight: float = 0.1
    seed: int = 0
    test_people: float = 0.25
    queries_per_person: int = 1
    val_people: float = 0.1
    device: str = "auto"
    head_init: str = "data"
    head_refit: str = "off"
    opq_iterations: int = 30
    itq_iterations: int = 50
    refine_bits: int | None = None
    center_weight: float = 0.1
    quant_weight: float = 0.1
    compact_weight: float = 0.1
    scoring: str = "hamming"

    def resolved_epochs(self, frozen_trunk: bool) -> int:
        """`epochs`, or its default for this kind of trunk (see Args)."""
        if self.epochs is not None:
            return self.epochs
        return 0 if frozen_trunk else 20

    def resolved_device(self) -> str:
        """'auto' -> 'cuda' when a GPU is visible, else 'cpu'."""
        import torch

        if self.device == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise ConfigError(f"device {self.device!r} asked for, but torch sees no CUDA GPU "
                              f"(torch {torch.__version__}); use --device cpu or auto")
        return self.device

    def __post_init__(self):
        if self.head_init not in ("data", "random"):
            raise ConfigError(f"head_init must be 'data' or 'random', got {self.head_init!r}")
        if self.head_refit not in ("off", "data"):
            raise ConfigError(f"head_refit must be 'off' or 'data', got {self.head_refit!r}")
        if self.scoring not in ("hamming", "asymmetric"):
            raise ConfigError(f"scoring must be 'hamming' or 'asymmetric', got {self.scoring!r}")
        if self.opq_iterations < 1:
            raise ConfigError(f"opq_iterations must be >= 1, got {self.opq_iterations}")
        if self.refine_bits is not None and (self.refine_bits < 0 or self.refine_bits % 8):
            raise ConfigError(f"refine_bits must be 0 or a positive multiple of 8, got {self.refine_bits}")

    def resolved_refine_bits(self, embedding_dim: int) -> int:
        """`refine_bits`, or its default for embeddings of this length (see Args)."""
        if self.refine_bits is not None:
            return self.refine_bits
        return 256 if embedding_dim % 32 == 0 else 0

    def resolved_scale(self, input_size: int) -> float:
        if self.scale is not None:
            return self.scale
        return 40.0 if input_size >= 112 else 20.0

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})
