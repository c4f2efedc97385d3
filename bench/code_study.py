"""Which codes find unseen people best: candidates measured on VALIDATION people only.

    python -m bench.code_study --data ../shared/data/lfw5 [--only NAME ...] [--splits 6]

The people `facepq bench quality` holds out (its query and distractor people, same seed)
are never read here. The study draws `splits` random validation protocols from the
benchmark's TRAINING people: each time 2/3 of them fit the codes, and of the other 1/3,
25/55 are query people (up to 5 photos each, 2 of them queries) and 30/55 distractors,
the same shape as the benchmark. Reported: mAP@all / float mAP, mean ± standard error
over the splits (and per split). Each experiment is a function of (fit embeddings,
queries, gallery) -> scores, so a new idea is a few lines.

What the README reports from it (2-vCPU EPYC; 64-bit codes unless said): see
"Codes for unseen people" in the README.
"""
from __future__ import annotations

import argparse
import sys

import numpy as np

from bench.distractor_quality import PHOTOS_PER_QUERY_PERSON, QUERIES_PER_PERSON, QUERY_SHARE, split


def _unit(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def cosine(q, g):
    return _unit(q) @ _unit(g).T


def validation_splits(people_of: np.ndarray, n: int, seed: int = 0):
    """[(fit idx, query idx, gallery idx)] over the photos whose people are in `people_of` (training people only)."""
    people = sorted(set(people_of))
    out = []
    for r in range(n):
        rng = np.random.default_rng(seed + 1000 + r)
        order = rng.permutation(len(people))
        val = [people[i] for i in order[:round(len(people) / 3)]]
        fit = np.flatnonzero(~np.isin(people_of, val))
        order = np.random.default_rng(seed + 2000 + r).permutation(len(val))
        query_people = {val[i] for i in order[:round(len(val) * QUERY_SHARE)]}
        pick = np.random.default_rng(seed + 3000 + r)
        queries, gallery = [], []
        for person in sorted(val):
            photos = np.flatnonzero(people_of == person)
            if person not in query_people:
                gallery.extend(photos.tolist())
                continue
            photos = np.sort(pick.choice(photos, min(PHOTOS_PER_QUERY_PERSON, len(photos)), replace=False))
            chosen = set(pick.choice(len(photos), QUERIES_PER_PERSON, replace=False).tolist())
            for j, i in enumerate(photos.tolist()):
                (queries if j in chosen else gallery).append(i)
        out.append((fit, np.array(queries), np.array(gallery)))
    return out


# ---------------------------------------------------------------- candidates
def opqn_codec(fit, bits=64, K=None, opq_iterations=30, seed=0):
    from opqn_model.config import ModelConfig
    from opqn_model.head_init import init_head_from_features
    from opqn_model.methods.opqn import build_head

    cfg = ModelConfig(trunk="dlib", bits=bits, K=K).resolved()
    head = build_head(cfg, fit.shape[1])
    init_head_from_features(head, fit, opq_iterations, seed)
    return head.eval().export_codec()


def codec_scores(codec, q, g):
    from facepq_core.codes import score_codes

    return score_codes(codec.query_tables(q), codec.encode(g), codec.spec)


def refined(codec, q, g):
    from facepq_core.refine import rescore

    rows = codec.encode(g)
    return np.stack([rescore(codec.kernel, t, rows) for t in codec.query_tables(q)])


def whitened(power):
    def scores(f, q, g):
        x = _unit(f)
        mean = x.mean(0)
        w, v = np.linalg.eigh(np.cov((x - mean).T, bias=True))
        p = (v @ np.diag((w + 1e-6) ** -power) @ v.T).astype(np.float32)
        t = lambda e: ((_unit(e) - mean) @ p).astype(np.float32)
        return codec_scores(opqn_codec(t(f)), t(q), t(g))
    return scores


def query_expansion(n, alpha):
    """alpha-QE (Radenovic et al.): the query plus its top n hits' reconstructions weighted by similarity^alpha,
    searched again; no extra bytes, a second round trip."""
    def scores(f, q, g):
        c = opqn_codec(f)
        unit, norms = c._project(q)
        zq = _unit((unit * norms.astype(np.float32)).reshape(len(q), -1))
        a = c.assignment / np.linalg.norm(c.assignment, axis=1, keepdims=True)
        codes = c.encode(g)
        xg = np.concatenate([a[m][:, codes[:, m]].T for m in range(c.M)], 1) / np.sqrt(c.M)
        s = zq @ xg.T
        top = np.argsort(-s, 1)[:, :n]
        w = np.maximum(np.take_along_axis(s, top, 1), 0) ** alpha
        return (zq + np.einsum("qn,qnd->qd", w, xg[top])) @ xg.T
    return scores


def faiss_scores(kind):
    def scores(f, q, g):
        import faiss

        from bench.model_quality import faiss_opq_pq_scores

        if kind == "opq+pq":
            return faiss_opq_pq_scores(f, q, g, 64)
        mean = _unit(f).mean(0)
        prep = lambda x: np.ascontiguousarray(_unit(_unit(x) - mean), dtype=np.float32)
        index = faiss.IndexResidualQuantizer(f.shape[1], 8, 8, faiss.METRIC_INNER_PRODUCT) if kind == "rq" else \
            faiss.IndexLocalSearchQuantizer(f.shape[1], 8, 8, faiss.METRIC_INNER_PRODUCT)
        index.train(prep(f))
        index.add(prep(g))
        dist, ids = index.search(prep(q), len(g))
        out = np.full((len(q), len(g)), -np.inf, np.float32)
        np.put_along_axis(out, ids, dist, 1)
        return out
    return scores


def two_stage(kind, candidates):
    """64-bit OPQN first pass, the top `candidates` re-scored by a refinement tier fitted on the same photos."""
    def scores(f, q, g):
        from bench.distractor_quality import two_stage_scores
        from facepq_core.codecs.float16 import Float16Codec
        from opqn_model.refine_fit import fit_refine_pq

        refine = Float16Codec(f.shape[1]) if kind == "float16" else fit_refine_pq(f, int(kind.split(":")[1]))
        return two_stage_scores(codec_scores(opqn_codec(f), q, g), refined(refine, q, g), candidates)
    return scores


def restarts(seeds):
    """k-means/OPQ restarts: the seed whose spherical k-means objective on the fit photos is highest."""
    def scores(f, q, g):
        best, best_obj = None, -np.inf
        for seed in range(seeds):
            c = opqn_codec(f, seed=seed)
            obj = float(c._logits(c._project(f)[0]).max(-1).mean())
            if obj > best_obj:
                best, best_obj = c, obj
        return codec_scores(best, q, g)
    return scores


# name -> scores(fit embeddings, query embeddings, gallery embeddings); "gallery" experiments also fit on g
EXPERIMENTS = {
    "float": lambda f, q, g: cosine(q, g),
    "opqn 64 (data start, the default)": lambda f, q, g: codec_scores(opqn_codec(f), q, g),
    "opqn 48": lambda f, q, g: codec_scores(opqn_codec(f, 48), q, g),
    "opqn 32": lambda f, q, g: codec_scores(opqn_codec(f, 32), q, g),
    "opqn 64 fitted on fit + gallery (unlabelled)": lambda f, q, g: codec_scores(opqn_codec(np.concatenate([f, g])),
                                                                                 q, g),
    "opqn 64, 16 x 16 (4-bit)": lambda f, q, g: codec_scores(opqn_codec(f, K=16), q, g),
    "opqn 64, whitened^0.25 first": whitened(0.25),
    "opqn 64, whitened^0.5 first": whitened(0.5),
    "opqn 64, 10 OPQ iterations": lambda f, q, g: codec_scores(opqn_codec(f, opq_iterations=10), q, g),
    "opqn 64, 60 OPQ iterations": lambda f, q, g: codec_scores(opqn_codec(f, opq_iterations=60), q, g),
    "opqn 64, best of 5 restarts": restarts(5),
    "opqn 64 + aQE n=1 a=3": query_expansion(1, 3),
    "opqn 64 + aQE n=2 a=3": query_expansion(2, 3),
    "opqn 64 + aQE n=5 a=3": query_expansion(5, 3),
    "FAISS OPQ+PQ 64": faiss_scores("opq+pq"),
    "FAISS residual quantizer 64 (IP)": faiss_scores("rq"),
    "FAISS LSQ 64 (IP)": faiss_scores("lsq"),
    **{f"two-stage {kind}, R={r}": two_stage(kind, r) for kind in ("codes:256", "codes:128", "float16")
       for r in (50, 100, 500)},
}


def main(argv=None) -> int:
    from opqn_model.api import build_trunk
    from opqn_model.config import ModelConfig
    from opqn_model.datasets import list_photos
    from opqn_model.feature_cache import FeatureCache, embed_records
    from opqn_model.metrics import retrieval_metrics

    ap = argparse.ArgumentParser(prog="python -m bench.code_study", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True)
    ap.add_argument("--splits", type=int, default=6)
    ap.add_argument("--seed", type=int, default=0, help="the benchmark's seed (whose held-out people are skipped)")
    ap.add_argument("--only", nargs="*", help="experiment names (substrings) to run")
    args = ap.parse_args(argv)
    train = split(list_photos(args.data), args.seed)["train"]  # the benchmark's training people, nobody else
    trunk = build_trunk(ModelConfig(trunk="dlib"))
    emb, kept, _ = embed_records(train, trunk, trunk.default_pipeline(), FeatureCache(), progress=False)
    people = np.array([r.person for r in kept])
    splits = validation_splits(people, args.splits, args.seed)
    print(f"{len(kept)} photos of {len(set(people))} training people; {args.splits} validation splits of "
          f"~{np.mean([len(q) for _, q, _ in splits]):.0f} queries against ~{np.mean([len(g) for *_, g in splits]):.0f} "
          f"gallery photos")
    for name, fn in EXPERIMENTS.items():
        if args.only and not any(o in name for o in args.only):
            continue
        ratios = []
        for fit, qi, gi in splits:
            labels_q, labels_g = people[qi], people[gi]
            m = retrieval_metrics(fn(emb[fit], emb[qi], emb[gi]), labels_q, labels_g, ks=())["map"]
            ratios.append(m / retrieval_metrics(cosine(emb[qi], emb[gi]), labels_q, labels_g, ks=())["map"])
        r = np.array(ratios)
        print(f"{name:46s} x float {r.mean():.3f} ± {r.std() / np.sqrt(len(r)):.3f}   {np.round(r, 3).tolist()}",
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
