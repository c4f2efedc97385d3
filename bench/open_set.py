"""Open-set identification on people never seen in training, with distractors: DIR at FAR, codes vs float.

    python bench/open_set.py --data ../shared/data/lfw5 [--bits 32 64] [--json out.json]
    facepq bench openset --data ../shared/data/lfw5

Protocol (seeded; the people split is bench/model_quality.py's, so the model is the same):
* people are split into training people (70%) and unseen people (30%); one code head per
  length is fitted on the training people's dlib embeddings (0 epochs: the data-fitted head);
* the unseen people are split again: a third are *calibration people* (`facepq calibrate`'s
  measurement, made on them only), two thirds *evaluation people*;
* the evaluation people are cut into two halves; in each fold one half is enrolled
  (`--gallery-photos` photos per person in the gallery, their other photos are mated probes)
  and every photo of the other half is a non-mated probe; every photo of the training people
  is in the gallery as a distractor. Outcomes of the two folds are pooled.
DIR@FAR is computed for the codes (lookup tables against stored codes, as the nodes score)
and for float (cosine of the dlib embeddings); "calibrated" applies the thresholds measured on
the calibration people to the evaluation probes (the FAR a user actually gets).

The evaluation (opqn_model.open_set) takes score matrices, so a distractor protocol with
another gallery plugs in without changing it.
"""
from __future__ import annotations

import argparse
import logging
import pathlib
import sys
import time

import numpy as np

from bench.entry import run_main

log = logging.getLogger("bench.open_set")
FARS = (1e-2, 1e-3)




def fold_sets(people_rows: dict[str, list[int]], enrolled: list[str], strangers: list[str], gallery_photos: int,
              rng) -> tuple[list[int], list[int]]:
    """(gallery rows, probe rows) of one fold: `gallery_photos` of each enrolled person in the gallery, their
    other photos and every photo of the strangers as probes."""
    gallery, probes = [], []
    for person in enrolled:
        rows = list(people_rows[person])
        rng.shuffle(rows)
        gallery += rows[:gallery_photos]
        probes += rows[gallery_photos:]
    for person in strangers:
        probes += people_rows[person]
    return gallery, probes


def evaluate(codec, unseen_emb, unseen_labels, distractor_emb, distractor_labels, calibration, gallery_photos: int,
             seed: int) -> dict:
    """DIR@FAR of codes and float over the two folds; DIR and FAR at the calibration's thresholds."""
    from opqn_model.open_set import ProbeOutcomes, code_scores, dir_at_far, dir_at_threshold, float_scores

    labels = np.asarray(unseen_labels)
    rows = {}
    for i, p in enumerate(labels.tolist()):
        rows.setdefault(p, []).append(i)
    people = sorted(p for p in rows if len(rows[p]) > gallery_photos)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(people))
    half = [people[i] for i in order[: len(people) // 2]], [people[i] for i in order[len(people) // 2:]]
    outcomes = {"codes": [], "float": []}
    for enrolled, strangers in (half, half[::-1]):
        g, p = fold_sets(rows, enrolled, strangers, gallery_photos, rng)
        g_emb = np.concatenate([unseen_emb[g], distractor_emb])
        g_lab = np.concatenate([labels[g], np.asarray(distractor_labels)])
        outcomes["codes"].append(ProbeOutcomes.of(code_scores(codec, unseen_emb[p], g_emb), labels[p], g_lab))
        outcomes["float"].append(ProbeOutcomes.of(float_scores(unseen_emb[p], g_emb), labels[p], g_lab))
    result = {kind: dir_at_far(ProbeOutcomes.concat(parts), FARS) for kind, parts in outcomes.items()}
    pooled = ProbeOutcomes.concat(outcomes["codes"])
    # Thresholds measured on the calibration people, applied to these probes: a per-comparison FAR
    # target, and the strictest FAR the calibration measured (its highest impostor score).
    targets = [(op.far, op.threshold) for op in calibration.operating_points if op.far in FARS]
    strictest = calibration.far_range[0]
    targets.append((strictest, calibration.threshold_for(strictest)))
    result["calibrated"] = [{"far_target": far, **dir_at_threshold(pooled, t)} for far, t in targets]
    result["gallery_size"] = len(g_emb)
    return result


def run(data: str, bits_list, seed: int, out_dir: pathlib.Path, gallery_photos: int = 2) -> dict:
    from facepq_core.calibration import fit_calibration
    from opqn_model.api import FaceEncoder, build_trunk
    from opqn_model.calibrate import code_pair_scores
    from opqn_model.checkpoint import load_checkpoint
    from opqn_model.config import ModelConfig, TrainConfig
    from opqn_model.datasets import list_photos, split_people
    from opqn_model.feature_cache import FeatureCache, embed_records
    from opqn_model.train import train

    records = list_photos(data)
    train_recs, unseen_recs = split_people(records, 0.3, seed)
    trunk = build_trunk(ModelConfig(trunk="dlib"))
    cache = FeatureCache()
    train_emb, train_kept, _ = embed_records(train_recs, trunk, trunk.default_pipeline(), cache, progress=False)
    unseen_emb, unseen_kept, _ = embed_records(unseen_recs, trunk, trunk.default_pipeline(), cache, progress=False)
    unseen_people = sorted({r.person for r in unseen_kept})
    order = np.random.default_rng(seed + 1).permutation(len(unseen_people))
    calib_people = {unseen_people[i] for i in order[: len(unseen_people) // 3]}
    is_cal = np.array([r.person in calib_people for r in unseen_kept])
    cal_emb, cal_lab = unseen_emb[is_cal], [r.person for r, c in zip(unseen_kept, is_cal) if c]
    ev_emb, ev_lab = unseen_emb[~is_cal], [r.person for r, c in zip(unseen_kept, is_cal) if not c]
    dis_lab = [f"distractor:{r.person}" for r in train_kept]
    rows = []
    for bits in bits_list:
        t0 = time.monotonic()
        summary = train(data, out_dir / f"dlib-{bits}", ModelConfig(trunk="dlib", bits=bits),
                        TrainConfig(epochs=0, batch_size=256, lr=0.1, seed=seed, test_people=0.0,
                                    queries_per_person=0), records=train_recs, progress=False)
        enc = FaceEncoder.from_checkpoint(load_checkpoint(summary["model"]))
        gen, imp = code_pair_scores(enc.codec, cal_emb, cal_lab)
        cal = fit_calibration(gen, imp, enc.fingerprint, enc.codec.name, FARS)
        res = evaluate(enc.codec, ev_emb, ev_lab, train_emb, dis_lab, cal, gallery_photos, seed)
        res.update(bits=bits, M=enc.codec.spec.M, K=enc.codec.spec.K, seconds=round(time.monotonic() - t0, 1),
                   calibration={"people": len(calib_people), "genuine_pairs": cal.genuine_pairs,
                                "impostor_pairs": cal.impostor_pairs})
        rows.append(res)
        log.info("%d bits done in %.0f s", bits, time.monotonic() - t0)
    return {"data": str(data), "train_people": len({r.person for r in train_kept}), "distractors": len(train_kept),
            "calibration_people": len(calib_people), "evaluation_people": len(set(ev_lab)),
            "gallery_photos_per_person": gallery_photos, "rows": rows}


def print_table(result: dict) -> None:
    r0 = result["rows"][0]
    print(f"{result['evaluation_people']} evaluation people never seen in training (2 folds: half enrolled with "
          f"{result['gallery_photos_per_person']} photos each, half strangers), {result['distractors']} distractor "
          f"photos of {result['train_people']} training people in the gallery; {r0['codes']['n_mated']} mated and "
          f"{r0['codes']['n_nonmated']} non-mated probes; calibration on {result['calibration_people']} other people")
    print(f"{'bits':>4} {'what':>6} {'rank-1':>7} " + " ".join(f"{'DIR@' + format(f, '.0e'):>10}" for f in FARS)
          + "  calibrated per-comparison FAR target -> this search's DIR / FAR")
    for r in result["rows"]:
        for kind in ("float", "codes"):
            res = r[kind]
            cells = " ".join(f"{p['dir']:10.3f}" + ("" if p["measurable"] else "*") for p in res["points"])
            cal = ""
            if kind == "codes":
                cal = "  " + ", ".join(f"{c['far_target']:.1e} -> {c['dir']:.3f} / {c['far']:.3f}" for c in r["calibrated"])
            print(f"{r['bits']:>4} {kind:>6} {res['rank1']:7.3f} {cells}{cal}")
    print("* fewer non-mated probes than 1/FAR: the threshold only refuses every non-mated probe seen")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="facepq bench openset", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True)
    ap.add_argument("--bits", type=int, nargs="+", default=[32, 64])
    ap.add_argument("--gallery-photos", type=int, default=2, help="photos of each enrolled person in the gallery")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=".facepq/bench-open-set")
    ap.add_argument("--json")
    return run_main(ap, argv, lambda a: run(a.data, a.bits, a.seed, pathlib.Path(a.out), a.gallery_photos), print_table)


if __name__ == "__main__":
    sys.exit(main())
