"""Method 'opqn': the OPQN head trained with the OPQN loss (Zhang, Zhe & Yan, Pattern Recognition 2023).

A trainable trunk (resnet20) starts at random and trains end to end with the head, as
in the paper. A frozen trunk's head (dlib) starts as a product quantizer of the
training embeddings (head_init.py; "epoch 0", scored on validation people like every
trained epoch); with a few hundred training people the loss after that lowers
unseen-people mAP, so frozen trunks default to 0 epochs (TrainConfig.resolved_epochs).
The best epoch on validation becomes model.pt; when that is the data start it is
fitted again with the validation people included.

The codec (facepq_core.codecs.opqn) is exported from the head's weights
(OPQNHead.export_codec); the checkpoint proves its codebooks with a fingerprint of the
fixed construction.
"""
from __future__ import annotations

import logging
import math
import time

import numpy as np
import torch
from tqdm import tqdm

from facepq_core.errors import CheckpointError, ConfigError
from opqn_model.checkpoint import load_checkpoint, save_checkpoint
from opqn_model.codebooks import codebook_fingerprint, orthonormal_codebooks
from opqn_model.head import OPQNHead
from opqn_model.head_init import init_head_from_features
from opqn_model.input_whitening import make_input_whitening
from opqn_model.losses import OPQNLoss
from opqn_model.methods import register_method

log = logging.getLogger(__name__)


def expected_codebook_fingerprint(model_config) -> str:
    cfg = model_config.resolved()
    return codebook_fingerprint(orthonormal_codebooks(cfg.M, cfg.K, cfg.sub_dim))


def _augment(batch: torch.Tensor) -> torch.Tensor:
    """Random horizontal flip of uint8 crops [B, 3, S, S] (faces are left-right symmetric)."""
    flip = torch.rand(batch.shape[0], device=batch.device) < 0.5
    batch = batch.clone()
    batch[flip] = batch[flip].flip(-1)
    return batch


def build_head(model_config, in_dim: int) -> OPQNHead:
    spec = model_config.code_spec()
    return OPQNHead(in_dim, spec.M, spec.K, model_config.sub_dim, model_config.dropout,
                    input_whitening=make_input_whitening(in_dim, model_config.whitening))


@register_method
class OPQNMethod:
    name = "opqn"
    codec_name = "opqn"

    # ---- checkpoints -------------------------------------------------------------------------------
    def proofs(self, model_config) -> dict:
        return {"codebook_fingerprint": expected_codebook_fingerprint(model_config)}

    def verify(self, payload: dict, model_config, path) -> None:
        books = expected_codebook_fingerprint(model_config)
        stored_books = payload["head"].get("codebooks") if isinstance(payload.get("head"), dict) else None
        if payload.get("codebook_fingerprint") != books or stored_books is None or \
                codebook_fingerprint(stored_books.numpy()) != books:
            raise CheckpointError(
                f"{path}: codebooks do not match the construction for M={model_config.M}, K={model_config.K}, "
                f"d={model_config.sub_dim} (file edited, or written by an incompatible facepq)")

    def codec(self, payload: dict):
        head = OPQNHead.from_state_dict(payload["head"], payload["model_config"])
        return head.eval().export_codec()

    # ---- training ----------------------------------------------------------------------------------
    @staticmethod
    def _refit_trained(setup, head, trunk, best: dict):
        """head_refit='data': a head fitted to the embeddings of the best checkpoint's trunk, on the training and
        validation people (TrainConfig.head_refit says why it is not put to a validation vote). Returns its state."""
        trunk.load_state_dict(best["trunk_state"])
        train_config = setup.train_config
        embeddings = [setup.embeddings()] + ([setup.val_embeddings()] if len(setup.val_inputs) else [])
        init_head_from_features(head, np.concatenate(embeddings), train_config.opq_iterations, train_config.seed,
                                progress=setup.progress)
        log.info("head refitted to the embeddings of the epoch-%d trunk (%d photos)", best["epoch"],
                 sum(len(e) for e in embeddings))
        return head.state_dict()

    def check_config(self, model_config, train_config, trunk) -> None:
        model_config.code_spec()

    def train(self, setup) -> dict:
        model_config, train_config, trunk = setup.model_config, setup.train_config, setup.trunk
        spec = model_config.code_spec()
        out_dir, people, labels, resumed = setup.out_dir, setup.people, setup.labels, setup.resumed
        device = torch.device(train_config.resolved_device())
        head = build_head(model_config, trunk.feature_dim).to(device)
        criterion = OPQNLoss(spec.M, model_config.sub_dim, len(people), train_config.margin,
                             train_config.resolved_scale(model_config.input_size),
                             train_config.entropy_weight).to(device)
        params = list(head.parameters()) + list(criterion.parameters())
        trainable_trunk = setup.trainable_trunk
        if trainable_trunk:
            trunk.to(device)
            params += list(trunk.parameters())
        # A frozen trunk's embeddings exist before training: start the head as their product
        # quantizer (see head_init.py for why and the numbers); a resumed run keeps its weights.
        data_init = train_config.head_init == "data" and not trainable_trunk and not resumed
        epochs = train_config.resolved_epochs(frozen_trunk=not trainable_trunk)
        if epochs < (0 if data_init else 1):
            raise ConfigError(f"epochs={epochs} trains nothing: 0 epochs keep a frozen trunk's data-initialised "
                              "head (head_init='data'); anything else needs at least 1")
        if data_init:  # (an input whitening starts there too, as the embeddings' PCA-whitening)
            init_head_from_features(head, setup.fit_embeddings(), train_config.opq_iterations, train_config.seed,
                                    progress=setup.progress)
        elif head.input_whitening is not None and not resumed:
            head.input_whitening.init_pca(setup.fit_embeddings())
        log.info("training on %s", device)
        optimizer = torch.optim.SGD(params, lr=train_config.lr, momentum=train_config.momentum,
                                    weight_decay=train_config.weight_decay)
        n = len(labels)
        steps_per_epoch = max(1, math.ceil(n / train_config.batch_size))
        total_steps = steps_per_epoch * epochs
        warmup = min(steps_per_epoch, max(1, total_steps // 10))
        schedule = lambda s: (s + 1) / warmup if s < warmup else 0.5 * (1 + math.cos(math.pi * (s - warmup) / max(1, total_steps - warmup)))  # noqa: E731
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        start_epoch, step, best_map = 0, 0, -1.0
        if resumed:
            if resumed.get("num_classes") != len(people):
                raise CheckpointError("cannot resume: the data's training people differ from the checkpoint's")
            head.load_state_dict(resumed["head"])
            if trainable_trunk:
                trunk.load_state_dict(resumed["trunk_state"])
            criterion.load_state_dict(resumed["loss"])
            optimizer.load_state_dict(resumed["optimizer"])
            scheduler.load_state_dict(resumed["scheduler"])
            start_epoch, step, best_map = resumed["epoch"], resumed["step"], resumed.get("best_map", -1.0)
            log.info("resumed from %s at epoch %d", setup.resume_path, start_epoch)

        inputs_t = torch.from_numpy(np.ascontiguousarray(setup.inputs))
        if trainable_trunk:
            inputs_t = inputs_t.permute(0, 3, 1, 2)  # NHWC uint8 -> NCHW, converted in the trunk
        gen = torch.Generator().manual_seed(train_config.seed)
        history = []
        common = setup.checkpoint_extra()

        def save(path, epoch, metrics, resumable: bool):
            extra = dict(common, epoch=epoch, step=step, best_map=best_map, metrics=metrics)
            if resumable:
                extra.update(loss=criterion.state_dict(), optimizer=optimizer.state_dict(),
                             scheduler=scheduler.state_dict())
            return save_checkpoint(path, model_config, head.state_dict(),
                                   trunk.state_dict() if trainable_trunk else {}, **extra)

        def validation_map() -> float:
            head.eval()
            try:
                return setup.validation_map(head.export_codec())
            finally:
                head.train()

        if data_init:
            # epoch 0 competes for best.pt: on LFW the OPQN loss rarely improves on the data init
            val_map = validation_map()
            history.append({"epoch": 0, "loss": float("nan"), "val_map": val_map})
            log.info("epoch 0 (data init) val code mAP %.4f", val_map)
            best_map = -1.0 if math.isnan(val_map) else val_map
            save(out_dir / "last.pt", 0, history[-1], resumable=True)
            save(out_dir / "best.pt", 0, history[-1], resumable=False)
        head.train()
        if trainable_trunk:
            trunk.train()
        t_start = time.monotonic()
        for epoch in range(start_epoch, epochs):
            perm = torch.randperm(n, generator=gen)
            bar = tqdm(range(steps_per_epoch), desc=f"epoch {epoch + 1}/{epochs}", unit="batch",
                       disable=not setup.progress, leave=False)
            t0, seen, running, loss_sum, batches = time.monotonic(), 0, 0.0, 0.0, 0
            for b in bar:
                idx = perm[b * train_config.batch_size:(b + 1) * train_config.batch_size]
                if len(idx) < 2:
                    continue
                x = inputs_t[idx].to(device, non_blocking=True)
                feats = trunk(_augment(x)) if trainable_trunk else x
                parts = criterion(head(feats), labels[idx].to(device))
                optimizer.zero_grad(set_to_none=True)
                parts["loss"].backward()
                optimizer.step()
                scheduler.step()
                step += 1
                seen += len(idx)
                loss_sum, batches = loss_sum + parts["loss"].item(), batches + 1
                running = 0.9 * running + 0.1 * parts["loss"].item() if running else parts["loss"].item()
                rate = seen / max(1e-9, time.monotonic() - t0)
                bar.set_postfix(loss=f"{running:.3f}", lr=f"{scheduler.get_last_lr()[0]:.4f}", rate=f"{rate:.0f}/s")
            val_map = validation_map()
            elapsed = time.monotonic() - t_start
            eta = elapsed / (epoch + 1 - start_epoch) * (epochs - epoch - 1)
            history.append({"epoch": epoch + 1, "loss": loss_sum / max(1, batches), "val_map": val_map})
            log.info("epoch %d/%d loss %.4f (ce_x %.3f ce_s %.3f entropy %.3f) val code mAP %.4f  %.0f samples/s  "
                     "ETA %.0fs", epoch + 1, epochs, history[-1]["loss"], parts["ce_x"], parts["ce_s"],
                     parts["entropy"], val_map, seen / max(1e-9, time.monotonic() - t0), eta)
            improved = math.isnan(val_map) or val_map > best_map
            if improved:
                best_map = -1.0 if math.isnan(val_map) else val_map
            save(out_dir / "last.pt", epoch + 1, history[-1], resumable=True)
            if improved:
                save(out_dir / "best.pt", epoch + 1, history[-1], resumable=False)
        best = load_checkpoint(out_dir / "best.pt" if (out_dir / "best.pt").exists() else out_dir / "last.pt")
        head_state = best["head"]
        head_refitted = trainable_trunk and train_config.head_refit == "data"
        if head_refitted:
            head_state = self._refit_trained(setup, head, trunk, best)
        refit = data_init and best["epoch"] == 0 and len(setup.val_inputs) > 0
        if refit:
            # Validation chose the data init; fit it again on the validation people too (the
            # seen-protocol queries stay out). More people give better codewords: on 3 folds of
            # LFW training people, 64 bits, 90% -> 100% of them lifts unseen mAP 0.924 -> 0.933.
            # best_map stays the score of the init fitted without them.
            init_head_from_features(head, setup.fit_embeddings(with_val=True),
                                    train_config.opq_iterations, train_config.seed, progress=setup.progress)
            head_state = head.state_dict()
            log.info("data init chosen on validation: refitted on the %d training + %d validation photos",
                     len(setup.inputs), len(setup.val_inputs))
        model_path = out_dir / "model.pt"
        fingerprint = save_checkpoint(model_path, best["model_config"], head_state, best["trunk_state"],
                                      **common, epoch=best["epoch"], step=best["step"], best_map=best.get("best_map"),
                                      metrics=best.get("metrics"), refit_with_val_people=refit,
                                      head_refitted=head_refitted)
        return setup.summary(model_path, fingerprint, epochs=epochs, best_val_map=best_map, history=history,
                             refit_with_val_people=refit, head_refitted=head_refitted)
