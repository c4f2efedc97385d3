"""What Python gRPC itself costs in the cluster's shape, with facepq's own work taken out.

Three processes like the load benchmark's cluster: two backends and a relay, on loopback.
A backend answers a unary call by burning a given time of CPU with the GIL released
(sha256 over a buffer, as the scan kernel releases it) and replying ~400 bytes, like a
node's top-10; the relay fans a call out to both backends exactly as the coordinator
does (all but the last call on a pool thread, the last on the handler's thread) and
replies with one of the answers. A client sends an 8 KiB request (a 64-bit model's
lookup table) to the relay, one call at a time.

`floor_ms` = p50 of (client latency - the slower backend's own busy time in that call):
the transport and fan-out cost that no change inside facepq can remove on this machine.
The load benchmark prints it next to facepq's own overhead, measured in the same run.

Run alone: python bench/grpc_floor.py --work-ms 12 --requests 300
"""
from __future__ import annotations

import argparse
import hashlib
import struct
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

SERVICE, METHOD = "floor.Backend", "Call"
REQUEST_BYTES = 8192
REPLY_BYTES = 400


def _server(handler, port: int):
    import grpc

    server = grpc.server(ThreadPoolExecutor(max_workers=4))
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(
        SERVICE, {METHOD: grpc.unary_unary_rpc_method_handler(handler)})])
    port = server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    print(f"listening on 127.0.0.1:{port}", flush=True)
    server.wait_for_termination()


def _burner(work_ms: float):
    """A function burning ~work_ms of one core with the GIL released; returns the seconds it took."""
    buf = np.ones(64 << 20, dtype=np.uint8).tobytes()  # pages written, so timing sees no first-touch faults
    sample = memoryview(buf)[: 8 << 20]
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        hashlib.sha256(sample).digest()
        times.append(time.perf_counter() - t0)
    per_ms = (8 << 20) / max(min(times) * 1e3, 1e-6)
    size = min(len(buf), max(4096, int(work_ms * per_ms)))
    view = memoryview(buf)[:size]

    def burn() -> float:
        t = time.perf_counter()
        hashlib.sha256(view).digest()
        return time.perf_counter() - t
    return burn


def serve_backend(port: int, work_ms: float) -> None:
    burn = _burner(work_ms)

    def handle(request: bytes, context) -> bytes:
        busy = burn()
        return struct.pack("<d", busy * 1e3) + bytes(REPLY_BYTES - 8)
    _server(handle, port)


def fan_out(calls, request, pool: ThreadPoolExecutor, timeout: float = 30) -> list:
    """Every call at once, as the coordinator makes its node calls: all but the last as blocking calls
    on pool threads, the last on this thread (a grpc future would start a thread per call)."""
    futures = [pool.submit(call, request, timeout=timeout) for call in calls[:-1]]
    last = calls[-1](request, timeout=timeout)
    return [f.result() for f in futures] + [last]


def serve_relay(port: int, backends: list[str]) -> None:
    import grpc

    calls = [grpc.insecure_channel(b).unary_unary(f"/{SERVICE}/{METHOD}") for b in backends]
    pool = ThreadPoolExecutor(max_workers=16)

    def handle(request: bytes, context) -> bytes:
        replies = fan_out(calls, request, pool)
        slowest = max(struct.unpack_from("<d", r)[0] for r in replies)
        return struct.pack("<d", slowest) + replies[0][8:]
    _server(handle, port)


def _start(args: list[str]):
    """This file run as a `backend` or `relay` server (bench.harness); returns (process, address)."""
    from bench.harness import ServerProcess, StartFailed  # here: this file also runs as a script

    try:
        proc = ServerProcess(args, program=[sys.executable, __file__])
    except StartFailed as exc:
        raise RuntimeError(f"grpc floor {args[0]} did not start: {exc.output[-2000:]}") from None
    return proc, proc.address


def measure_floor(work_ms: float, requests: int = 300, warmup: int = 20) -> dict:
    """{'floor_ms', 'relay_ms', 'work_ms'}: p50s over `requests` sequential calls through the relay."""
    import grpc

    procs = []
    try:
        backends = []
        for _ in range(2):
            proc, address = _start(["backend", "0", str(work_ms)])
            procs.append(proc)
            backends.append(address)
        proc, relay = _start(["relay", "0", ",".join(backends)])
        procs.append(proc)
        call = grpc.insecure_channel(relay).unary_unary(f"/{SERVICE}/{METHOD}")
        request = bytes(REQUEST_BYTES)
        latency, work = [], []
        for i in range(warmup + requests):
            t0 = time.perf_counter()
            reply = call(request, timeout=30)
            if i >= warmup:
                latency.append((time.perf_counter() - t0) * 1e3)
                work.append(struct.unpack_from("<d", reply)[0])
        lat, busy = np.asarray(latency), np.asarray(work)
        return {"floor_ms": float(np.median(lat - busy)), "relay_ms": float(np.median(lat)),
                "work_ms": float(np.median(busy))}
    finally:
        for proc in procs:
            proc.kill()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work-ms", type=float, default=12.0, help="CPU each backend burns per call")
    ap.add_argument("--requests", type=int, default=300)
    args = ap.parse_args(argv)
    r = measure_floor(args.work_ms, args.requests)
    print(f"client -> relay -> 2 backends ({args.requests} calls): p50 {r['relay_ms']:.2f} ms, backends busy "
          f"{r['work_ms']:.2f} ms; gRPC floor (latency - slower backend's busy time) p50 {r['floor_ms']:.2f} ms")
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "backend":
        serve_backend(int(sys.argv[2]), float(sys.argv[3]))
    elif len(sys.argv) > 1 and sys.argv[1] == "relay":
        serve_relay(int(sys.argv[2]), sys.argv[3].split(","))
    else:
        sys.exit(main())
