"""`facepq train` and `facepq eval`."""
from __future__ import annotations

import json
import logging
import math
import pathlib
import sys

log = logging.getLogger(__name__)

DEFAULT_WORKDIR = pathlib.Path(".facepq")


def register(sub) -> None:
    from opqn_model.config import ModelConfig, TrainConfig
    from opqn_model.config_flags import add_config_flags
    from opqn_model.methods import method_names

    p = sub.add_parser("train", help="train a model (trunk + code head: OPQN, or binary codes: ITQ, DMH, DAGH)",
                       description="Train a model. Without --data it trains on generated synthetic faces. "
                                   "Every option's default comes from opqn_model.config (ModelConfig, TrainConfig).")
    p.add_argument("--data", help="folder of <person>/<photo> or a CSV/Parquet list (path, person); "
                                  "default: generated synthetic faces")
    p.add_argument("--out", default=str(DEFAULT_WORKDIR / "model"), help="checkpoint folder (default %(default)s)")
    add_config_flags(p, ModelConfig, names={"M": ["--codebooks", "-M"], "K": ["--codewords", "-K"],
                                            "trunk_width": ["--width"]},
                     extra_help={"trunk": "Known: resnet20, dlib, densenet, densenet_attention."})
    add_config_flags(p, TrainConfig, extra_help={"method": f"Known: {', '.join(method_names())}."})
    p.add_argument("--align", choices=["dlib", "none"], help="face alignment: dlib (detect + 5 landmarks) or none "
                   "(photos are already face crops); default dlib, none for synthetic faces")
    p.add_argument("--no-face", choices=["skip", "centre-crop"], default="skip",
                   help="photos where no face is found: skip (counted) or use a centre crop")
    p.add_argument("--unlabelled", metavar="PHOTOS",
                   help="frozen trunks: photos without labels (a folder or list; e.g. the gallery to be indexed, "
                        "or a sample of it) whose embeddings join the fit of the codes; see README")
    p.add_argument("--resume", help="continue from a last.pt checkpoint")
    p.add_argument("--synthetic-people", type=int, default=200)
    p.add_argument("--synthetic-photos", type=int, default=12)
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(handler=run_train)

    e = sub.add_parser("eval", help="mAP@all, P@k, R@10 of codes vs float features",
                       description="Evaluate a checkpoint on the seen or unseen identity protocol.")
    e.add_argument("--model", required=True, help="checkpoint (model.pt, or the folder `facepq train --out` wrote)")
    e.add_argument("--data", required=True, help="folder of <person>/<photo> or a CSV/Parquet list")
    e.add_argument("--protocol", choices=["seen", "unseen"], default="unseen")
    e.add_argument("--queries-per-person", type=int, default=1)
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--method", help=f"refuse a checkpoint not trained with this method ({', '.join(method_names())})")
    e.add_argument("--json", action="store_true", help="print one JSON object")
    e.add_argument("--no-progress", action="store_true")
    e.set_defaults(handler=run_eval)

    c = sub.add_parser("calibrate", help="measure score thresholds for target false-accept rates (open-set search)",
                       description="Measure a model's genuine and impostor score distributions (codes against "
                                   "queries, as the query nodes score them) on people it never trained on, and store "
                                   "beside the checkpoint the thresholds for target false-accept rates with the "
                                   "true-accept rate at each and a score -> similarity [0, 1] mapping. Searches and "
                                   "verifications with --far use it.")
    c.add_argument("--model", required=True, help="checkpoint (model.pt, or the folder `facepq train --out` wrote)")
    c.add_argument("--data", required=True, help="photos of people NOT used in training: <person>/<photo> or a list")
    c.add_argument("--far", type=_far, nargs="+", default=None, metavar="FAR",
                   help="target false-accept rates (default 1e-2 1e-3 1e-4)")
    c.add_argument("--out", help="where to write it (default: beside the checkpoint, <model>.calibration.json)")
    c.add_argument("--max-photos", type=int, default=6000, help="photos used at most (a seeded sample)")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--json", action="store_true", help="print the calibration as JSON")
    c.add_argument("--no-progress", action="store_true")
    c.set_defaults(handler=run_calibrate)


def _far(text: str) -> float:
    import argparse

    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a false-accept rate is a number like 1e-3, got {text!r}") from None
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"a false-accept rate is in (0, 1), got {text}")
    return value


def synthetic_data(root: pathlib.Path, people: int, photos: int, size: int, seed: int = 0) -> pathlib.Path:
    from opqn_model.synthetic import write_faces

    return pathlib.Path(write_faces(root, people, photos, size=size, seed=seed))


def run_train(args) -> int:
    import time

    from facepq_core.progress import bars_enabled
    from opqn_model.api import build_pipeline, build_trunk
    from opqn_model.config import ModelConfig, TrainConfig
    from opqn_model.config_flags import config_from_flags
    from opqn_model.train import train

    t_start = time.monotonic()  # the summary's time is the whole command's (data generation included)
    model_config = config_from_flags(ModelConfig, args)
    train_config = config_from_flags(TrainConfig, args)
    _check_whitening_flag(args.whitening, model_config)
    data, align = args.data, args.align
    if data is None:
        data = synthetic_data(DEFAULT_WORKDIR / f"synthetic-{args.synthetic_people}x{args.synthetic_photos}",
                              args.synthetic_people, args.synthetic_photos, size=max(64, model_config.input_size))
        align = align or "none"
        log.info("training on generated synthetic faces in %s", data)
    model_config.code_spec()  # refuse an invalid code before loading any data
    if args.resume and args.method is not None:
        from opqn_model.checkpoint import load_checkpoint

        load_checkpoint(args.resume, args.method)  # a run resumes with its own method, never another
    if align or args.no_face != "skip":  # else train() takes the trunk's default alignment
        model_config.pipeline = build_pipeline(model_config, build_trunk(model_config), mode=align,
                                               on_no_face=args.no_face).to_dict()
    summary = train(data, args.out, model_config, train_config, resume=args.resume,
                    progress=bars_enabled(not args.no_progress), unlabelled=args.unlabelled)
    wall = time.monotonic() - t_start
    print(f"trained {summary['epochs']} epochs on {summary['train_photos']} photos of {summary['train_people']} people "
          f"in {wall:.0f} s wall ({summary['input_seconds']:.0f} s reading photos"
          f"{' and embedding them' if summary['frozen_trunk'] else ''}, "
          f"{summary['fit_seconds']:.0f} s fitting, {wall - summary['seconds']:.0f} s setting up); best validation "
          f"code mAP {summary['best_val_map']:.4f}")
    for reason, count in sorted(summary["skipped"].items()):
        print(f"  skipped {count} photo(s): {reason}")
    print(f"model: {summary['model']}  (fingerprint {summary['fingerprint']})")
    print(f"next: facepq eval --model {summary['model']} --data {data} --protocol unseen")
    return 0


def _check_whitening_flag(dims, model_config) -> None:
    """`--whitening D`: refused unless 1..E on a frozen trunk (0 is the default "none", not a value to ask for)."""
    from facepq_core.errors import ConfigError
    from opqn_model.api import build_trunk
    from opqn_model.input_whitening import check_whitening

    if dims is None:
        return
    if dims < 1:
        raise ConfigError(f"--whitening takes the whitened length D >= 1, got {dims} (leave it out for no whitening)")
    check_whitening(model_config, build_trunk(model_config))


def run_eval(args) -> int:
    from facepq_core.progress import bars_enabled
    from opqn_model.evaluate import evaluate_checkpoint

    result = evaluate_checkpoint(args.model, args.data, args.protocol, args.queries_per_person, args.seed,
                                 progress=bars_enabled(not args.no_progress), method=args.method)
    if args.json:
        json.dump({k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in result.items()}, sys.stdout)
        print()
        return 0
    print(f"{args.protocol} protocol: {result['n_queries']} queries, gallery {result['n_gallery']}, "
          f"{result['n_people']} people, {result['bits']}-bit codes ({result['M']}x{result['K']}), trunk {result['trunk']}")
    codes = f"{result.get('method', 'opqn').upper()} codes (lookup tables)"
    rows = [(codes, result["map"], result["p_at_1"], result["p_at_5"], result["r_at_10"]),
            ("float, trunk embedding", result["map_float"], result["p_at_1_float"], None, None),
            ("float, head before quantization", result["map_float_head"], None, None, None)]
    print(f"{'':34} {'mAP@all':>8} {'P@1':>7} {'P@5':>7} {'R@10':>7}")
    fmt = lambda v: f"{v:7.4f}" if v is not None else f"{'':7}"  # noqa: E731
    for name, m, p1, p5, r10 in rows:
        print(f"{name:34} {m:8.4f} {fmt(p1)} {fmt(p5)} {fmt(r10)}")
    print(f"code mAP / float mAP = {result['map_ratio_vs_float']:.3f}")
    return 0


def run_calibrate(args) -> int:
    from facepq_core.calibration import DEFAULT_FARS
    from facepq_core.progress import bars_enabled
    from opqn_model.calibrate import calibrate_model

    cal, path = calibrate_model(args.model, args.data, fars=args.far or DEFAULT_FARS, out=args.out,
                                max_photos=args.max_photos, seed=args.seed,
                                progress=bars_enabled(not args.no_progress))
    if args.json:
        print(json.dumps(cal.to_dict()))
        return 0
    print(f"calibrated model {cal.model_fingerprint} ({cal.codec}) on {cal.photos} photos of {cal.people} people: "
          f"{cal.genuine_pairs} genuine and {cal.impostor_pairs} impostor pairs")
    print(f"{'FAR':>8} {'threshold':>12} {'TAR':>7} {'similarity':>10}")
    for p in cal.operating_points:
        print(f"{p.far:8.0e} {p.threshold:12.5g} {p.tar:7.4f} {float(cal.similarity(p.threshold)):10.4f}")
    for far in cal.extra.get("unmeasurable_fars", []):
        print(f"{far:8.0e}  not measured: needs at least {int(1 / far)} impostor pairs (more people or photos)")
    print(f"written to {path}")
    return 0
