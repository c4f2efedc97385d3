"""Fixtures of the end-to-end tests: real ORL photos (../shared/data/att_faces), their dlib embeddings,
models trained with the real `facepq train`, indexes ingested with the real Ray job, and clusters of real
query-node and coordinator processes.

The dlib embeddings of the 400 ORL photos are computed once per run into a feature cache in a temporary
folder (FACEPQ_CACHE) that every `facepq` subprocess of these tests, and every xdist worker, shares.
"""
from __future__ import annotations

import csv
import os
import pathlib

import grpc
import numpy as np
import pytest

from tests.support.processes import Procs, run_cli
from tests.support.run_dir import one_at_a_time, shared_dir


@pytest.fixture(scope="session")
def feature_cache(tmp_path_factory) -> pathlib.Path:
    root = shared_dir(tmp_path_factory, "feature_cache")  # one for the run: every xdist worker reads it
    saved = os.environ.get("FACEPQ_CACHE")
    os.environ["FACEPQ_CACHE"] = str(root)  # this process and every subprocess started after
    yield root
    if saved is None:
        os.environ.pop("FACEPQ_CACHE", None)
    else:
        os.environ["FACEPQ_CACHE"] = saved


@pytest.fixture(scope="session")
def orl(att_faces, feature_cache):
    """dlib embeddings of every ORL photo with a face: dict(records, embeddings float32 [n, 128], persons, names)."""
    from opqn_model.datasets import list_photos
    from opqn_model.feature_cache import FeatureCache, embed_records
    from opqn_model.trunks import create_trunk

    trunk = create_trunk("dlib")
    with one_at_a_time(feature_cache):  # the first worker embeds the photos, the others find them cached
        emb, kept, _ = embed_records(list_photos(att_faces), trunk, trunk.default_pipeline(), FeatureCache(),
                                     progress=False)
    return dict(records=kept, embeddings=emb, persons=np.array([r.person for r in kept]),
                names=np.array([pathlib.Path(r.path).name for r in kept]))


def train_cli(out: pathlib.Path, data, *flags) -> pathlib.Path:
    """`facepq train --data DATA --out OUT FLAGS`; returns the folder (what --model accepts)."""
    done = run_cli("train", "--data", data, "--out", out, "--no-progress", *flags, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return out


def ingest_embeddings(model, index, embeddings, persons, sources, shards: int = 2, *flags):
    """`facepq ingest` of an embeddings file (X.npy + X.csv sidecar) through a local Ray (FLAGS: more options)."""
    path = pathlib.Path(index).parent / f"{pathlib.Path(index).name}-gallery.npy"
    np.save(path, np.asarray(embeddings, np.float32))
    with open(path.with_suffix(".csv"), "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["person", "source"])
        writer.writerows(zip(persons, sources))
    done = run_cli("ingest", "--model", model, "--gallery", path, "--index", index, "--shards", shards,
                   "--no-progress", *flags, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]


class Cluster:
    """Two query nodes (one shard each) and a coordinator over a static node list, as real processes."""

    def __init__(self, model, index):
        from facepq_proto.facepq.v1 import facepq_pb2_grpc

        self.procs = Procs()
        try:
            nodes = [self.procs.node(index, [s]) for s in (0, 1)]
            self.coordinator = self.procs.coordinator(model, index, "--nodes", ",".join(n.address for n in nodes))
        except BaseException:
            self.procs.kill_all()
            raise
        self.channel = grpc.insecure_channel(self.coordinator.address)
        self.stub = facepq_pb2_grpc.CoordinatorStub(self.channel)

    def close(self):
        self.channel.close()
        self.procs.kill_all()
