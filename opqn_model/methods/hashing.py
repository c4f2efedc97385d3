"""What DMH and DAGH share: a hash head on a trunk, trained with an identity loss, exported as a binary codec.

Both work on either kind of trunk: on the frozen dlib embedding only the head trains (its
inputs are the cached 128-d descriptors); on a trainable trunk (densenet, densenet_attention,
resnet20) trunk and head train end to end on face crops. Every epoch the head is exported to
its numpy codec and scored on the validation people (unseen-identity code mAP, Hamming); the
best epoch becomes model.pt. The checkpoint stores the trunk weights, the head and the codec's
state, so ingest and search use exactly the codec evaluated here.
"""
from __future__ import annotations

import copy
import logging
import math
import time

import numpy as np
import torch

from facepq_core.codecs import codec_from_state
from facepq_core.errors import CheckpointError, ConfigError
from opqn_model.checkpoint import save_checkpoint
from opqn_model.hash_head import HashHead
from opqn_model.input_whitening import make_input_whitening
from opqn_model.methods.opqn import _augment

log = logging.getLogger(__name__)

DEFAULT_EPOCHS = 20


class HashingMethod:
    """Base of the hashing methods. A subclass sets `name`, `codec_name`, `gate` (a FeatureGate in the head)
    and implements `make_loss(bits, num_classes, train_config)` and `loss_input(h)` (what the loss sees)."""

    name: str
    codec_name: str
    gate = False

    # ---- checkpoints -------------------------------------------------------------------------------
    def proofs(self, model_config) -> dict:
        return {}

    def verify(self, payload: dict, model_config, path) -> None:
        state = payload.get("codec_state")
        if not isinstance(state, dict) or "projection" not in state:
            raise CheckpointError(f"{path}: a {self.name} checkpoint must carry its codec state")
        if tuple(state["projection"].shape[1:]) != (model_config.bits,):
            raise CheckpointError(f"{path}: {self.name} projection {tuple(state['projection'].shape)} does not give "
                                  f"the {model_config.bits} bits its config says")

    def codec(self, payload: dict):
        return codec_from_state(payload["codec"], payload["codec_state"])  # this method's codec, or it whitened

    # ---- training ----------------------------------------------------------------------------------
    def check_config(self, model_config, train_config, trunk) -> None:
        if model_config.bits % 8 or not 8 <= model_config.bits <= 1024:
            raise ConfigError(f"{self.name} codes need --bits a multiple of 8 between 8 and 1024, "
                              f"got {model_config.bits}")
        if train_config.epochs is not None and train_config.epochs < 1:
            raise ConfigError(f"method {self.name} trains its head: --epochs must be >= 1, got {train_config.epochs}")

    def make_loss(self, bits: int, num_classes: int, train_config) -> torch.nn.Module:
        raise NotImplementedError

    def loss_input(self, h: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def build_head(self, in_dim: int, bits: int, whitening: int = 0) -> HashHead:
        return HashHead(in_dim, bits, gate=self.gate, input_whitening=make_input_whitening(in_dim, whitening))

    def train(self, setup) -> dict:
        model_config, cfg, trunk = setup.model_config, setup.train_config, setup.trunk
        if setup.resumed:
            raise ConfigError(f"method {self.name} does not resume (a run is minutes); train again without --resume")
        device = torch.device(cfg.resolved_device())
        trainable = setup.trainable_trunk
        head = self.build_head(trunk.feature_dim, model_config.bits, model_config.whitening).to(device)
        if not trainable:  # a frozen trunk's features are known: standardise (and whiten) them with their own statistics
            head.init_statistics(setup.fit_embeddings())
        criterion = self.make_loss(model_config.bits, len(setup.people), cfg).to(device)
        params = list(head.parameters()) + list(criterion.parameters())
        if trainable:
            trunk.to(device)
            params += list(trunk.parameters())
        epochs = cfg.epochs if cfg.epochs is not None else DEFAULT_EPOCHS
        n = len(setup.labels)
        steps_per_epoch = max(1, math.ceil(n / cfg.batch_size))
        total = steps_per_epoch * epochs
        optimizer = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * s / total)))
        inputs = torch.from_numpy(np.ascontiguousarray(setup.inputs))
        if trainable:
            inputs = inputs.permute(0, 3, 1, 2)
        gen = torch.Generator().manual_seed(cfg.seed)
        history, best, best_map, step = [], None, -math.inf, 0
        log.info("training %s on %s: %d epochs of %d steps", self.name, device, epochs, steps_per_epoch)
        for epoch in range(epochs):
            head.train()
            trunk.train() if trainable else None
            perm = torch.randperm(n, generator=gen)
            t0, loss_sum, batches = time.monotonic(), 0.0, 0
            for b in range(steps_per_epoch):
                idx = perm[b * cfg.batch_size:(b + 1) * cfg.batch_size]
                if len(idx) < 2:
                    continue
                x = inputs[idx].to(device)
                feats = trunk(_augment(x)) if trainable else x
                parts = criterion(self.loss_input(head(feats)), setup.labels[idx].to(device))
                optimizer.zero_grad(set_to_none=True)
                parts["loss"].backward()
                optimizer.step()
                scheduler.step()
                step, loss_sum, batches = step + 1, loss_sum + parts["loss"].item(), batches + 1
            head.eval()
            val_map = setup.validation_map(head.export_codec())
            history.append({"epoch": epoch + 1, "loss": loss_sum / max(1, batches), "val_map": val_map})
            log.info("epoch %d/%d loss %.4f (%s) val code mAP %.4f  %.0f samples/s", epoch + 1, epochs,
                     history[-1]["loss"], " ".join(f"{k} {float(v):.3f}" for k, v in parts.items() if k != "loss"),
                     val_map, n / max(1e-9, time.monotonic() - t0))
            if math.isnan(val_map) or val_map > best_map:  # without validation people the last epoch wins
                best_map = val_map if not math.isnan(val_map) else -math.inf
                best = (epoch + 1, copy.deepcopy(head.state_dict()),
                        copy.deepcopy(trunk.state_dict()) if trainable else {})
        best_epoch, head_state, trunk_state = best
        head.load_state_dict(head_state)
        head.eval()
        codec = head.export_codec(scoring=cfg.scoring)
        model_path = setup.out_dir / "model.pt"
        metrics = history[best_epoch - 1]
        fingerprint = save_checkpoint(model_path, model_config, head_state, trunk_state, method=self.name,
                                      codec_state=codec.state(), **setup.checkpoint_extra(), epoch=best_epoch,
                                      step=step, best_map=metrics["val_map"], metrics=metrics)
        return setup.summary(model_path, fingerprint, epochs=epochs, best_val_map=metrics["val_map"],
                             history=history)
