"""Quality on a gallery that looks like a real archive: unseen people searched among many distractors.

    facepq bench quality --data ../shared/data/lfw5 [--bits 32 48 64] [--json out.json]
    (the older protocol without distractors: `facepq bench quality --protocol unseen`)

Protocol (seeded; the split sizes are printed with the table):
- people are split into training people (45%) and held-out people (55%); of the held-out
  people, 25/55 are query people and 30/55 distractor people;
- per query person up to 5 photos are used (a seeded choice): 2 are queries, the others go
  in the gallery; per distractor person every photo goes in the gallery and nobody queries
  them. Every query is ranked against the whole gallery (mAP@all, P@1, R@10).
Models are trained with the product's defaults on the training people's photos only
(`facepq train --trunk dlib --bits B`, i.e. the OPQN data start refitted with its
validation people, plus the 32-byte refinement codes codes:256); FAISS OPQ+PQ (centred)
and ITQ are fitted on the same photos' embeddings.

Rows per code length (`--rows` picks groups of them; OPQN and float are always there):
  float          cosine of the dlib embeddings (the reference)
  FAISS OPQ+PQ   8-bit sub-quantizers, asymmetric distances
  OPQN / ITQ     the codecs, scored as the query nodes score them
  DMH / DAGH     hash heads on the dlib embedding (`facepq train --trunk dlib --method dmh|dagh`, their
                 defaults), B-bit codes scored by Hamming distance
  OPQN + whitening  `facepq train --whitening D` (D = 128, 64): the learned whitening (shift + linear started
                 as the PCA-whitening of the training embeddings, then L2-normalised) in front of the OPQN head
  OPQN + gallery the OPQN model trained with `--unlabelled`: the distractors and the gallery
                 photos of half the query people ("indexed") join the fit of the codes; the
                 other half's photos ("enrolled later") never reach it. mAP is reported for
                 both halves, so the effect of the fit on later enrolments is measured.
                 FAISS gets the same photos (row FAISS + gallery).
  two-stage      the OPQN first pass keeps the top R of the gallery (one shard), re-scored by
                 the refinement tier (codes:256 = 32 bytes, float16 = 256 bytes): R = 50, 100,
                 500. The ranking for mAP@all is the R re-scored candidates, then the rest in
                 first-pass order: what a node computes (tests/query_node/test_two_stage.py
                 checks the nodes against this definition).
  OPQN + aQE     alpha-query expansion as the coordinator runs it (query_node.service): the query's top n
                 gallery codes by the OPQN first pass, reconstructed by the codec, combined with the query
                 (similarity^alpha weights; facepq_core.expansion), and the gallery re-ranked by the expanded
                 query's tables. n = 1, 2, 3 at alpha = 3.
  OPQN + DBA     database-side augmentation as `facepq ingest --dba-k K --dba-alpha 3` makes the gallery
                 (indexer.dba: exact kNN over the whole gallery, distractors included): K = 1, 2, 4; the
                 queries are not augmented. Row "DBA k=2 + aQE n=2" combines both.
This gallery is too small to time, so every row's search time is measured on 1M of its own codes
(bench/scan_time.py: the gallery's embeddings repeated with noise, each row's codec; one query's
tables + the node's kernel, one thread; float = FAISS IndexFlatIP, FAISS OPQ+PQ = its IndexPQ; off
with `--no-scan-time`). Through a node's whole search path (hit metadata, positional reads of the
refinement rows): `facepq bench twostage`, or `--time-rows N` here.
"""
from __future__ import annotations

import argparse
import logging
import pathlib
import sys
import time

import numpy as np

from bench.entry import run_main

log = logging.getLogger("bench.distractor_quality")

TRAIN_PEOPLE = 0.45
QUERY_SHARE = 25 / 55       # of the held-out people
PHOTOS_PER_QUERY_PERSON = 5
QUERIES_PER_PERSON = 2
CANDIDATES = (50, 100, 500)
QE_SETTINGS = ((1, 3.0), (2, 3.0), (3, 3.0))   # alpha-query expansion (n, alpha)
DBA_SETTINGS = ((1, 3.0), (2, 3.0), (4, 3.0))  # database-side augmentation (k, alpha)
REFINE_KINDS = ("codes:256", "float16")
HASHING_METHODS = ("dmh", "dagh")
WHITENING_DIMS = (128, 64)  # `facepq train --whitening D`: the learned whitening in front of the OPQN head
# Row groups (`--rows`); OPQN and float are always measured: every other row is read against them.
ROW_GROUPS = ("faiss", "itq", "gallery", "hashing", "whitening", "twostage", "aqe", "dba")


def split(records, seed: int) -> dict:
    """The protocol's photo lists: train, query, gallery (query people's), distractors, and the query people
    split in halves ('indexed' / 'later') for the gallery-fit measurement."""
    from opqn_model.datasets import split_people, split_photos_per_person

    train, held = split_people(records, 1 - TRAIN_PEOPLE, seed)
    distractors, query_people = split_people(held, QUERY_SHARE, seed + 1)
    rng = np.random.default_rng(seed + 2)
    capped = []
    for person in sorted({r.person for r in query_people}):
        photos = sorted(r for r in query_people if r.person == person)
        keep = rng.choice(len(photos), min(PHOTOS_PER_QUERY_PERSON, len(photos)), replace=False)
        capped.extend(photos[i] for i in sorted(keep))
    gallery, queries = split_photos_per_person(capped, QUERIES_PER_PERSON, seed + 3)
    later, indexed = split_people(capped, 0.5, seed + 4)
    return {"train": train, "queries": queries, "gallery": gallery, "distractors": distractors,
            "indexed_people": sorted({r.person for r in indexed}), "later_people": sorted({r.person for r in later})}


def two_stage_scores(first: np.ndarray, refined: np.ndarray, candidates: int) -> np.ndarray:
    """A [Q, G] score matrix ranking as a two-stage search does: the top `candidates` of `first` (ties by the
    lower row) by `refined` (ties by the lower row), then every other row in first-pass order."""
    order = np.argsort(-first, axis=1, kind="stable")
    out = np.empty(first.shape, dtype=np.float64)
    ranks = -np.arange(first.shape[1], dtype=np.float64)
    for q in range(first.shape[0]):
        cand = order[q, :candidates]
        ranked = np.concatenate([cand[np.lexsort((cand, -refined[q, cand]))], order[q, candidates:]])
        out[q, ranked] = ranks
    return out


def _metrics(scores, q_lab, g_lab, mask=None) -> dict:
    from opqn_model.metrics import retrieval_metrics

    if mask is not None:
        scores, q_lab = scores[mask], [p for p, m in zip(q_lab, mask) if m]
    m = retrieval_metrics(scores, q_lab, g_lab, ks=(1, 10))
    return {"map": m["map"], "p_at_1": m["p_at_1"], "r_at_10": m["r_at_10"]}


def _codec_scores(codec, q_emb, g_emb) -> np.ndarray:
    from facepq_core.codes import score_codes

    return score_codes(codec.query_tables(q_emb), codec.encode(g_emb), codec.spec)


def _refined(codec, q_emb, g_emb) -> np.ndarray:
    from facepq_core.refine import rescore

    rows = codec.encode(g_emb)
    return np.stack([rescore(codec.kernel, t, rows) for t in codec.query_tables(q_emb)])


def expanded_scores(codec, q_emb, g_codes: np.ndarray, n: int, alpha: float) -> np.ndarray:
    """[Q, G] scores of an alpha-QE search as the coordinator runs it: the first pass's top n (ties by the lower
    row) reconstructed from their codes, combined with the query, the gallery scored by the expanded tables."""
    from facepq_core.codes import score_codes
    from facepq_core.expansion import alpha_expand

    first = score_codes(codec.query_tables(q_emb), g_codes, codec.spec)
    vectors = codec.expansion_vector(q_emb)
    out = np.empty(first.shape, dtype=np.float64)
    for q in range(len(q_emb)):
        top = np.argsort(-first[q], kind="stable")[:n]
        expanded = alpha_expand(vectors[q], codec.reconstruct(g_codes[top]), alpha)
        out[q] = score_codes(codec.tables_from_vector(expanded[None])[0], g_codes, codec.spec)
    return out


def _train(records, out_dir, bits, seed, unlabelled=None, method: str = "opqn", whitening: int = 0):
    from opqn_model.api import FaceEncoder
    from opqn_model.config import ModelConfig, TrainConfig
    from opqn_model.train import train

    config = ModelConfig(trunk="dlib", bits=bits, **({"whitening": whitening} if whitening else {}))
    summary = train(None, out_dir, config,
                    TrainConfig(method=method, seed=seed, test_people=0.0, queries_per_person=0), records=records,
                    progress=False,
                    unlabelled=unlabelled)
    return FaceEncoder.load(summary["model"])


def run(data: str, bits_list, seed: int, out_dir: pathlib.Path, time_rows: int = 0, scan_time: bool = True,
        groups=ROW_GROUPS) -> dict:
    from bench import scan_time as st
    from bench.model_quality import faiss_opq_pq, faiss_scores
    from facepq_core.codes import score_codes
    from indexer.dba import DBA, augment
    from opqn_model.api import build_trunk
    from opqn_model.config import ModelConfig
    from opqn_model.datasets import list_photos
    from opqn_model.evaluate import cosine_scores
    from opqn_model.feature_cache import FeatureCache, embed_records
    from opqn_model.methods.itq import fit_itq

    parts = split(list_photos(data), seed)
    trunk = build_trunk(ModelConfig(trunk="dlib"))
    cache, emb = FeatureCache(), {}
    for name in ("train", "queries", "gallery", "distractors"):
        emb[name], parts[name], _ = embed_records(parts[name], trunk, trunk.default_pipeline(), cache, progress=False)
    g_recs = parts["gallery"] + parts["distractors"]
    g_emb = np.concatenate([emb["gallery"], emb["distractors"]])
    q_emb, q_lab, g_lab = emb["queries"], [r.person for r in parts["queries"]], [r.person for r in g_recs]
    later = np.array([p in set(parts["later_people"]) for p in q_lab])
    indexed_set = set(parts["indexed_people"])
    fit_extra = [r for r in g_recs if r.person not in set(parts["later_people"])]  # distractors + indexed half
    extra_emb = np.concatenate([emb["distractors"], emb["gallery"][[r.person in indexed_set
                                                                    for r in parts["gallery"]]]])
    result = {"data": str(data), "seed": seed, "train_people": len({r.person for r in parts["train"]}),
              "train_photos": len(parts["train"]), "query_people": len(set(q_lab)), "queries": len(q_lab),
              "gallery_of_query_people": len(parts["gallery"]),
              "distractor_people": len({r.person for r in parts["distractors"]}),
              "distractor_photos": len(parts["distractors"]), "gallery": len(g_recs),
              "later_queries": int(later.sum()), "rows": []}
    float_scores = cosine_scores(q_emb, g_emb)
    reference = _metrics(float_scores, q_lab, g_lab)
    result["float"] = reference
    # Search time per query at 1M codes (bench.scan_time): every row's own codes of one gallery-like million.
    million = st.gallery_like(g_emb, st.MILLION, seed) if scan_time else None
    if scan_time:
        reference["ms_1m"] = st.float_ms(million, q_emb)

    def timed(fn, *args):
        return fn(*args) if scan_time else None
    for bits in bits_list:
        t0 = time.monotonic()
        want = set(groups)
        enc = _train(parts["train"], out_dir / f"dlib-{bits}", bits, seed)  # OPQN: every group compares with it
        first = _codec_scores(enc.codec, q_emb, g_emb)
        faiss_ok = len(emb["train"]) >= 256 and "faiss" in want  # FAISS's k-means needs as many points as centroids

        def codec_row(codec, scores, million_codes=None):
            """(scores, bytes/face, refinement bytes/face, ms/query at 1M of this codec's codes: `million_codes`
            when already encoded)."""
            return scores, codec.code_bytes, 0, timed(
                lambda: st.codec_ms(codec, q_emb, st.encode(codec, million) if million_codes is None else million_codes))

        def faiss_row(train, bits=bits):
            index, prep = faiss_opq_pq(train, bits)
            scores = faiss_scores(index, prep, q_emb, g_emb)
            if scan_time:
                index.add(prep(million))
            return scores, bits // 8, 0, timed(st.faiss_ms, index, prep(q_emb))

        # OPQN's million codes serve its own row and the two-stage, aQE and DBA timings: encoded once
        million_codes = st.encode(enc.codec, million) if scan_time else None
        itq = fit_itq(emb["train"], bits) if bits <= emb["train"].shape[1] and "itq" in want else None
        rows = {
            "FAISS OPQ+PQ": faiss_row(emb["train"]) if faiss_ok else None,
            "FAISS OPQ+PQ + gallery": faiss_row(np.concatenate([emb["train"], extra_emb]))
            if faiss_ok and "gallery" in want else None,
            "OPQN": codec_row(enc.codec, first, million_codes),
            "ITQ": codec_row(itq, _codec_scores(itq, q_emb, g_emb)) if itq is not None else None,
        }
        if "gallery" in want:
            enc_gallery = _train(parts["train"], out_dir / f"dlib-{bits}-gallery", bits, seed, unlabelled=fit_extra)
            rows["OPQN + gallery"] = codec_row(enc_gallery.codec, _codec_scores(enc_gallery.codec, q_emb, g_emb))
        for method in HASHING_METHODS if "hashing" in want else ():
            hashed = _train(parts["train"], out_dir / f"dlib-{bits}-{method}", bits, seed, method=method)
            rows[method.upper()] = codec_row(hashed.codec, _codec_scores(hashed.codec, q_emb, g_emb))
        for dims in WHITENING_DIMS if "whitening" in want else ():
            whitened = _train(parts["train"], out_dir / f"dlib-{bits}-whitening{dims}", bits, seed, whitening=dims)
            rows[f"OPQN + whitening D={dims}"] = codec_row(whitened.codec,
                                                           _codec_scores(whitened.codec, q_emb, g_emb))
        for kind in REFINE_KINDS if "twostage" in want else ():
            refine = enc.refine_codec(kind)
            refined = _refined(refine, q_emb, g_emb)
            million_rows = st.encode(refine, million) if scan_time else None
            for r in CANDIDATES:
                rows[f"OPQN + {kind}, R={r}"] = (two_stage_scores(first, refined, r), enc.codec.code_bytes,
                                                 refine.code_bytes, timed(st.two_stage_ms, enc.codec, refine, q_emb,
                                                                          million_codes, million_rows, r))
            del million_rows
        g_codes = enc.codec.encode(g_emb)
        qe_ms = {}
        for n, alpha in QE_SETTINGS if "aqe" in want else ():
            qe_ms[n] = timed(st.expansion_ms, enc.codec, q_emb, million_codes, n, alpha)
            rows[f"OPQN + aQE n={n} a={alpha:g}"] = (expanded_scores(enc.codec, q_emb, g_codes, n, alpha),
                                                    enc.codec.code_bytes, 0, qe_ms[n])
        # DBA changes which codes are stored, not their layout or kernel: OPQN's time (the million is not
        # augmented: its exact kNN is O(N^2)).
        for k, alpha in DBA_SETTINGS if "dba" in want else ():
            dba_codes = enc.codec.encode(augment(g_emb, DBA(k, alpha)))
            rows[f"OPQN + DBA k={k} a={alpha:g}"] = (score_codes(enc.codec.query_tables(q_emb), dba_codes,
                                                                 enc.codec.spec), enc.codec.code_bytes, 0,
                                                     rows["OPQN"][3])
            if k == 2 and "aqe" in want:
                rows["OPQN + DBA k=2 + aQE n=2"] = (expanded_scores(enc.codec, q_emb, dba_codes, 2, 3.0),
                                                   enc.codec.code_bytes, 0, qe_ms.get(2))
        del million_codes
        for name, row in rows.items():
            if row is None:
                continue
            scores, code_bytes, refine_bytes, ms_1m = row
            m = _metrics(scores, q_lab, g_lab)
            m.update(bits=bits, method=name, code_bytes=code_bytes, refine_bytes=refine_bytes, ms_1m=ms_1m,
                     map_vs_float=m["map"] / reference["map"],
                     map_indexed=_metrics(scores, q_lab, g_lab, ~later)["map"],
                     map_later=_metrics(scores, q_lab, g_lab, later)["map"])
            result["rows"].append(m)
        log.info("%d bits in %.0f s", bits, time.monotonic() - t0)
    if time_rows:
        from bench.two_stage_bench import run as time_run

        result["search_time"] = time_run(time_rows, 200, list(CANDIDATES))
    return result


def print_table(result: dict) -> None:
    print(f"distractor protocol ({result['data']}, seed {result['seed']}): {result['queries']} queries of "
          f"{result['query_people']} unseen people against a gallery of {result['gallery']} photos = "
          f"{result['gallery_of_query_people']} of the query people + {result['distractor_photos']} of "
          f"{result['distractor_people']} distractor people nobody queries; codes trained on "
          f"{result['train_photos']} photos of {result['train_people']} other people")
    f = result["float"]
    float_ms = f" {f['ms_1m']:.2f} ms/query at 1M (FAISS IndexFlatIP, one thread)" if f.get("ms_1m") else ""
    print(f"float (dlib, cosine): mAP {f['map']:.4f}  P@1 {f['p_at_1']:.4f}  R@10 {f['r_at_10']:.4f}  (512 B/face "
          f"as float32, 256 B as float16){float_ms}")
    print(f"{'bits':>4} {'method':28} {'mAP@all':>8} {'x float':>7} {'P@1':>6} {'R@10':>6} {'B/face mem':>10} "
          f"{'B/face refine':>13} {'ms at 1M':>8} {'mAP indexed':>11} {'mAP later':>9}")
    for r in result["rows"]:
        ms = f"{r['ms_1m']:8.3f}" if r.get("ms_1m") is not None else f"{'-':>8}"
        print(f"{r['bits']:>4} {r['method']:28} {r['map']:8.4f} {r['map_vs_float']:7.3f} {r['p_at_1']:6.3f} "
              f"{r['r_at_10']:6.3f} {r['code_bytes']:>10} {r['refine_bytes'] or '-':>13} {ms} {r['map_indexed']:11.4f} "
              f"{r['map_later']:9.4f}")
    if f.get("ms_1m"):
        print("(ms at 1M: one query's tables + the node's scan kernel over 1M of the row's own codes, one thread, "
              "top-10, median; bench/scan_time.py says what is and is not included)")
    print(f"('indexed' / 'later': the {result['queries'] - result['later_queries']} / {result['later_queries']} "
          f"queries of people whose gallery photos were / were not in the unlabelled fit of the + gallery rows)")
    if "search_time" in result:
        from bench.two_stage_bench import print_table as print_times

        print_times(result["search_time"])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="facepq bench quality", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True)
    ap.add_argument("--bits", type=int, nargs="+", default=[32, 48, 64])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--time-rows", type=int, default=0, help="also time two-stage search at this many codes")
    ap.add_argument("--rows", nargs="+", choices=ROW_GROUPS, default=list(ROW_GROUPS),
                    help="row groups to measure besides OPQN and float (default: all)")
    ap.add_argument("--no-scan-time", action="store_true",
                    help="skip the search time per query at 1M codes of each row (~1.5 GiB of memory, ~1 min a length)")
    ap.add_argument("--out", default=".facepq/bench-distractor-quality")
    ap.add_argument("--json")
    return run_main(ap, argv, lambda a: run(a.data, a.bits, a.seed, pathlib.Path(a.out), a.time_rows,
                                                        not a.no_scan_time, a.rows), print_table)


if __name__ == "__main__":
    sys.exit(main())
