"""From-scratch networks on face crops, scored on people they never trained on, one run.

    facepq bench scratch --data ../shared/data/att_faces [--bits 32 48 64] [--epochs 8] [--json out.json]

Protocol: people are split (seeded, `split_people`) into training people and unseen people. Each
method trains its whole network from random weights on the training people's photos only, through
`facepq train`'s Python API (`opqn_model.train.train`; no validation people, no held-out queries,
the head kept as trained, `head_refit="off"`, except opqn-refit):

    opqn        resnet20 trunk (flatten + FC) + OPQN product-quantization head
    opqn-refit  the same, its head then refitted to the trained trunk's embeddings (`head_refit="data"`,
                the demo's setting: OPQ + spherical k-means of the training people's embeddings)
    opqn-rmac   the same with R-MAC pooling (`pooling="rmac"`, Gordo et al. 2016)
    dmh         densenet trunk + DMH hash layer (Hamming codes)
    dagh        densenet_attention trunk + DAGH discrete hash layer (Hamming codes)
    itq         ITQ fitted on the training people's embeddings of the trained `opqn` resnet20 trunk

Each unseen person gives `--queries-per-person` query photos; the gallery is the rest of the unseen
people's photos. Codes are scored as the query nodes score them (`evaluate_embeddings`: the
codec's lookup tables against the stored codes); every network's own float trunk embedding is the
reference (cosine), reported as a row `float (<trunk>)` per model. mAP@all, P@1, R@10 are
opqn_model.metrics'. The crops are read without face detection (`mode="none"`), at `--input-size` px.
"""
from __future__ import annotations

import argparse
import logging
import pathlib
import time

import numpy as np

from bench.entry import run_main

log = logging.getLogger("bench.scratch_quality")

# name -> (training method, trunk, pooling, head_refit); the order is the table's
METHODS = {
    "opqn": ("opqn", "resnet20", "flat", "off"),
    "opqn-refit": ("opqn", "resnet20", "flat", "data"),
    "opqn-rmac": ("opqn", "resnet20", "rmac", "off"),
    "dmh": ("dmh", "densenet", "flat", "off"),
    "dagh": ("dagh", "densenet_attention", "flat", "off"),
}


def _split(data: str, unseen_people: int, queries_per_person: int, seed: int):
    from opqn_model.datasets import list_photos, split_people, split_photos_per_person

    records = list_photos(data)
    people = len({r.person for r in records})
    train_recs, unseen_recs = split_people(records, unseen_people / people, seed)
    gallery, queries = split_photos_per_person(unseen_recs, queries_per_person, seed)
    return train_recs, queries, gallery


def _embed(encoder, records) -> np.ndarray:
    crops, kept, skipped = encoder.prepare_photos([r.path for r in records])
    if skipped:
        from facepq_core.errors import DataError

        raise DataError(f"{len(skipped)} photos could not be read: {sorted(skipped.values())[:3]}")
    emb = np.concatenate([encoder.trunk_features(crops[i:i + 128]) for i in range(0, len(crops), 128)])
    if not np.isfinite(emb).all():
        from facepq_core.errors import DataError

        raise DataError(f"the {encoder.trunk_name} trunk gives non-finite features")
    return emb


def _row(name: str, bits, code_bytes: int, metrics: dict, **extra) -> dict:
    return {"method": name, "bits": int(bits), "code_bytes": code_bytes, "map": metrics["map"],
            "p_at_1": metrics["p_at_1"], "r_at_10": metrics["r_at_10"], **extra}


def run(data: str, bits_list, methods, epochs: int, unseen_people: int, queries_per_person: int, seeds,
        out_dir: pathlib.Path, input_size: int = 32, width: int = 16, batch_size: int = 32) -> dict:
    """`run_seed` for each seed (each its own people split, initialisation and batch order); rows carry the seed."""
    runs = [run_seed(data, bits_list, methods, epochs, unseen_people, queries_per_person, seed, out_dir / f"seed{seed}",
                     input_size, width, batch_size) for seed in seeds]
    return {**{k: v for k, v in runs[0].items() if k not in ("rows", "seed")}, "seeds": list(seeds),
            "rows": [row for r in runs for row in r["rows"]]}


def run_seed(data: str, bits_list, methods, epochs: int, unseen_people: int, queries_per_person: int, seed: int,
             out_dir: pathlib.Path, input_size: int = 32, width: int = 16, batch_size: int = 32) -> dict:
    """Train one network per (method, bits) and score it on the unseen people; returns the split and rows."""
    from opqn_model.api import FaceEncoder
    from opqn_model.config import ModelConfig, TrainConfig
    from opqn_model.evaluate import cosine_scores, evaluate_embeddings
    from opqn_model.face_pipeline import FacePipeline
    from opqn_model.methods.itq import fit_itq
    from opqn_model.metrics import retrieval_metrics
    from opqn_model.train import train

    train_recs, queries, gallery = _split(data, unseen_people, queries_per_person, seed)
    q_lab, g_lab = [r.person for r in queries], [r.person for r in gallery]
    pipeline = FacePipeline(size=input_size, mode="none").to_dict()
    rows = []
    for bits in bits_list:
        for name in methods:
            if name == "itq":
                continue  # fitted on the opqn run's trunk below
            method, trunk, pooling, head_refit = METHODS[name]
            t0 = time.monotonic()
            cfg = ModelConfig(trunk=trunk, bits=bits, input_size=input_size, trunk_width=width, pooling=pooling,
                              pipeline=pipeline)
            tcfg = TrainConfig(method=method, epochs=epochs, batch_size=batch_size, seed=seed, device="cpu",
                               test_people=0.0, val_people=0.0, queries_per_person=0, head_refit=head_refit)
            summary = train(data, out_dir / f"{name}-{bits}", cfg, tcfg, records=train_recs, progress=False)
            train_s = time.monotonic() - t0
            enc = FaceEncoder.load(summary["model"])
            q_emb, g_emb = _embed(enc, queries), _embed(enc, gallery)
            res = evaluate_embeddings(enc.codec, q_emb, q_lab, g_emb, g_lab)
            rows.append(_row(name, bits, enc.codec.spec.code_bytes, res, trunk=trunk, codec=enc.codec.name,
                             train_seconds=round(train_s, 1), seed=seed))
            fl = retrieval_metrics(cosine_scores(q_emb, g_emb), q_lab, g_lab)
            rows.append(_row(f"float ({name})", bits, 4 * enc.embedding_dim, fl, trunk=trunk, codec="float32",
                             seed=seed))
            log.info("%s %d bits: %.4f (float %.4f) in %.0fs", name, bits, res["map"], fl["map"], train_s)
            if name == "opqn" and "itq" in methods:
                tr_emb = _embed(enc, train_recs)
                itq = fit_itq(tr_emb, bits, seed=seed)
                ires = evaluate_embeddings(itq, q_emb, q_lab, g_emb, g_lab)
                rows.append(_row("itq", bits, itq.spec.code_bytes, ires, trunk=trunk, codec=itq.name, seed=seed))
    return {"data": str(data), "epochs": epochs, "input_size": input_size, "trunk_width": width, "seed": seed,
            "train_people": len({r.person for r in train_recs}), "train_photos": len(train_recs),
            "unseen_people": len(set(q_lab) | set(g_lab)), "n_queries": len(queries), "n_gallery": len(gallery),
            "rows": rows}


def summarise(rows) -> list[dict]:
    """Rows of one (method, bits) over the seeds -> mean and standard deviation of each metric."""
    groups: dict = {}
    for r in rows:
        groups.setdefault((r["method"], r["bits"]), []).append(r)
    out = []
    for (method, bits), rs in groups.items():
        s = {"method": method, "bits": bits, "trunk": rs[0]["trunk"], "code_bytes": rs[0]["code_bytes"], "n": len(rs)}
        for key in ("map", "p_at_1", "r_at_10"):
            v = np.array([r[key] for r in rs])
            s[key], s[key + "_std"] = float(v.mean()), float(v.std())
        s["train_seconds"] = float(np.mean([r["train_seconds"] for r in rs])) if "train_seconds" in rs[0] else None
        out.append(s)
    return sorted(out, key=lambda s: (s["bits"], s["method"].startswith("float"), -s["map"]))


def print_table(result: dict) -> None:
    print(f"trained from scratch on {result['train_photos']} photos of {result['train_people']} people, "
          f"{result['epochs']} epochs, {result['input_size']} px, width {result['trunk_width']}; "
          f"unseen: {result['n_queries']} queries, gallery {result['n_gallery']} photos of "
          f"{result['unseen_people']} people; seeds {result['seeds']} (mean ± std over seeds)")
    print(f"| {'method':<18} | {'trunk':<18} | bits | bytes/face | {'mAP@all':<13} | {'P@1':<13} | {'R@10':<13} "
          f"| train s |")
    print(f"|{'-' * 20}|{'-' * 20}|-----:|-----------:|{'-' * 15}|{'-' * 15}|{'-' * 15}|--------:|")
    for s in summarise(result["rows"]):
        cells = " | ".join(f"{s[k]:.3f} ± {s[k + '_std']:.3f}" for k in ("map", "p_at_1", "r_at_10"))
        secs = f"{s['train_seconds']:.0f}" if s["train_seconds"] is not None else ""
        print(f"| {s['method']:<18} | {s['trunk']:<18} | {s['bits']:>4} | {s['code_bytes']:>10} | {cells} | {secs:>7} |")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="facepq bench scratch", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="folder of person folders (e.g. ORL: ../shared/data/att_faces)")
    ap.add_argument("--bits", type=int, nargs="+", default=[32, 48, 64])
    ap.add_argument("--methods", nargs="+", default=[*METHODS, "itq"], choices=[*METHODS, "itq"],
                    help="itq needs opqn (it is fitted on that run's resnet20 embeddings)")
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--unseen-people", type=int, default=16)
    ap.add_argument("--queries-per-person", type=int, default=3)
    ap.add_argument("--input-size", type=int, default=32)
    ap.add_argument("--width", type=int, default=16, help="trunk width (resnet20 base channels; densenet growth x4)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4],
                    help="one run per seed: its own split of people, initialisation and batch order")
    ap.add_argument("--out", default=".facepq/bench-scratch")
    ap.add_argument("--json")
    return run_main(ap, argv, lambda a: run(a.data, a.bits, a.methods, a.epochs, a.unseen_people,
                                                        a.queries_per_person, a.seeds, pathlib.Path(a.out),
                                                        a.input_size, a.width, a.batch_size), print_table)


if __name__ == "__main__":
    raise SystemExit(main())
