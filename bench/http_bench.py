"""What the HTTP/JSON API costs beside gRPC: the same searches through both edges of one coordinator.

    facepq bench http --model model.pt [--index I | --rows 200000] [--requests 300]

Two query nodes and a coordinator with `--http-port` on loopback (bench.load_bench's cluster,
random codes under the model's fingerprint unless --index is given). One client sends the same
embedding search `--requests` times, one at a time, through facepq.client (gRPC, protobuf) and through
a keep-alive requests.Session (HTTP/1.1, JSON body, JSON answer), alternating in blocks of 10 so that
load changes on a shared machine hit both alike. Printed: client-side p50/p99 of each, the
coordinator's own time (`took_ms`, the same service behind both edges), and HTTP / gRPC.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
import time

import numpy as np

from bench.harness import REPO_ROOT, ServerProcess
from bench.load_bench import build_random_index, load_avg


def _pcts(xs) -> tuple[float, float]:
    return float(np.percentile(xs, 50)), float(np.percentile(xs, 99))


def run(model: str, index: str, requests_n: int, k: int = 10) -> dict:
    import requests

    from facepq.client import CoordinatorClient
    from opqn_model.api import FaceEncoder

    dim = FaceEncoder.load(model).embedding_dim
    node = ServerProcess(["node", "--index", index, "--shards", "0,1", "--port", "0"], timeout=180)
    coord = None
    try:
        coord = ServerProcess(["coordinator", "--model", model, "--index", index, "--port", "0", "--nodes",
                               node.address, "--http-port", "0"], timeout=180)
        http = re.search(r"facepq http serving on (http://\S+)", coord.text()).group(1)
        emb = np.random.default_rng(0).normal(size=dim).astype(np.float32)
        body = {"embedding": emb.tolist(), "k": k}
        times = {"grpc": [], "http": []}
        took = {"grpc": [], "http": []}
        with CoordinatorClient(coord.address, timeout=30) as client, requests.Session() as session:
            for _ in range(10):  # warm both paths (connections, first-call costs)
                client.search(embedding=emb, k=k)
                session.post(http + "/v1/search/embedding", json=body, timeout=30)
            for block in range(0, requests_n, 10):
                for _ in range(min(10, requests_n - block)):
                    t0 = time.perf_counter()
                    r = client.search(embedding=emb, k=k)
                    times["grpc"].append((time.perf_counter() - t0) * 1e3)
                    took["grpc"].append(r.took_ms)
                for _ in range(min(10, requests_n - block)):
                    t0 = time.perf_counter()
                    answer = session.post(http + "/v1/search/embedding", json=body, timeout=30).json()
                    times["http"].append((time.perf_counter() - t0) * 1e3)
                    took["http"].append(answer["took_ms"])
                    assert len(answer["hits"]) == k
        return {"requests": requests_n, "k": k, **{f"{e}_client": _pcts(times[e]) for e in times},
                **{f"{e}_took": _pcts(took[e]) for e in took}}
    finally:
        for proc in (coord, node):
            if proc is not None:
                proc.kill()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="facepq bench http", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--index", help="an index of this model (default: --rows random codes, temporary)")
    ap.add_argument("--rows", type=int, default=200_000)
    ap.add_argument("--requests", type=int, default=300)
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="facepq-http-") as tmp:
        index = args.index or os.path.join(tmp, "idx")
        if not os.path.exists(index):
            build_random_index(args.model, index, args.rows)
        print(f"machine: {os.cpu_count()} CPUs; {load_avg()}")
        r = run(args.model, index, args.requests)
        print(f"{r['requests']} sequential embedding searches, top-{r['k']}, one client, per edge:")
        print(f"{'edge':6s} {'client p50 ms':>14} {'client p99 ms':>14} {'coordinator p50 ms':>19}")
        for edge in ("grpc", "http"):
            (p50, p99), (t50, _) = r[f"{edge}_client"], r[f"{edge}_took"]
            print(f"{edge:6s} {p50:14.2f} {p99:14.2f} {t50:19.2f}")
        print(f"HTTP / gRPC at p50 (client side): {r['http_client'][0] / r['grpc_client'][0]:.2f}x; "
              f"{load_avg()}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(REPO_ROOT))
    sys.exit(main())
