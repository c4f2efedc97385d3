"""A tiny bounded run of bench/load_bench.py: correctness only (no errors, no incomplete answers, file
descriptors and memory not growing across hot reloads). Throughput and latency go to the benchmark report,
never here."""
from __future__ import annotations

import os
import pathlib
import threading

import pytest

from bench import grpc_floor

pytestmark = pytest.mark.timeout(240)


def _anonymous_memory_kb(pid: int) -> int:
    """RssAnon of a process in KiB, from /proc/PID/status."""
    for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1])
    raise AssertionError(f"no RssAnon in /proc/{pid}/status")


def _running(pid: int) -> bool:
    """True while `pid` exists (a process killed and reaped is gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.slow  # a soak: 9 s of searches by design, 16 hot reloads, a cluster of three processes
def test_bounded_load_and_hot_reload_soak(gallery, index):
    from bench import load_bench

    cluster = load_bench.start_cluster(str(gallery["model"]), str(index))
    try:
        res = load_bench.coordinator_load(cluster, gallery["enc"].embedding_dim, clients=3, seconds=3)
        assert res.requests > 0 and res.errors == 0 and res.incomplete == 0, res.error_codes
        assert len(res.latencies_ms) == res.requests

        # Hot reloads while 2 clients keep searching: no search fails, no fd or memory leak in the nodes.
        during = {}
        t = threading.Thread(target=lambda: during.update(
            r=load_bench.coordinator_load(cluster, gallery["enc"].embedding_dim, clients=2, seconds=6)))
        t.start()
        anon_kb = {node.pid: [] for node in cluster.nodes}

        def sample_memory(*_):
            for pid, samples in anon_kb.items():
                samples.append(_anonymous_memory_kb(pid))

        soak = load_bench.soak(cluster, reloads=16, on_reload=sample_memory)
        t.join(60)
        r = during["r"]
        assert r.requests > 0 and r.errors == 0 and r.incomplete == 0, r.error_codes
        assert soak.versions == list(range(soak.versions[0], soak.versions[0] + 16))
        assert set(anon_kb) == set(soak.fds) and all(len(a) == 16 for a in anon_kb.values())
        for pid, fds in soak.fds.items():
            # after a few reloads the node holds a bounded set of views: the count must plateau
            assert max(fds[4:]) - min(fds[4:]) <= 4, (pid, fds)
            # and so must its memory. Anonymous memory (heap and arrays; not library and index pages, which
            # the kernel may drop and fault back in on a busy machine) grew by at most 0.25 MiB over 16
            # reloads here; 8 MiB over the last 12 allows for the allocator and breaks with a leak of
            # ~0.7 MiB per reload (e.g. a view's arrays kept, a thread pool or a server per reload)
            anon = anon_kb[pid]
            assert max(anon[4:]) - anon[3] <= 8 * 1024, (pid, anon)
    finally:
        cluster.close()


def test_grpc_floor_starts_two_backends_and_a_relay_answers_every_call_and_stops_them(monkeypatch):
    """bench/grpc_floor.py (the load benchmark's reference for what Python gRPC costs) really starts its three
    processes (two backends and a relay pointed at both), answers every call through the relay, and stops
    them. Nothing here depends on how fast the machine is: the only comparisons are ones a slow machine
    cannot reverse (a call's latency contains the backend work done inside it)."""
    started = []
    real_start = grpc_floor._start

    def recording_start(args):
        proc, address = real_start(args)
        started.append((args[0], args, proc, address))
        return proc, address

    monkeypatch.setattr(grpc_floor, "_start", recording_start)
    r = grpc_floor.measure_floor(work_ms=3.0, requests=40, warmup=5)  # a call that fails raises here
    assert [role for role, *_ in started] == ["backend", "backend", "relay"]
    backends = [address for role, _, _, address in started if role == "backend"]
    assert len(set(backends)) == 2 and started[2][1][-1] == ",".join(backends)  # the relay fans out to both
    assert not [proc.pid for _, _, proc, _ in started if _running(proc.pid)], "measure_floor left a process running"
    # every reply carries the slower backend's busy time: > 0 only if the relay's call reached a backend
    assert r["work_ms"] > 0
    assert 0 < r["floor_ms"] < r["relay_ms"] and r["relay_ms"] > r["work_ms"]


def test_cpu_per_request_counts_each_process_and_the_client_by_its_own_work():
    """bench/load_bench.cpu_per_request with real processes: one that burns a fixed 0.4 s of CPU once `run`
    tells it to (and waits for it to say so), one that waits on its input. Every number compared is work
    done, not time elapsed."""
    import subprocess
    import sys

    from bench import load_bench

    burn = ("import sys, time\nprint('ready', flush=True)\nsys.stdin.readline()\nstart = time.process_time()\n"
            "while time.process_time() - start < 0.4: pass\nprint('done', flush=True)\ntime.sleep(600)\n")
    burner = subprocess.Popen([sys.executable, "-c", burn], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    sleeper = subprocess.Popen([sys.executable, "-c", "import sys; print('ready', flush=True); sys.stdin.readline()"],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert [p.stdout.readline().strip() for p in (burner, sleeper)] == ["ready", "ready"]  # start-ups done

        def run():
            burner.stdin.write("go\n")
            burner.stdin.flush()
            assert burner.stdout.readline().strip() == "done"  # blocks (no CPU) until the 0.4 s are spent
            return load_bench.LoadResult(requests=10, errors=0, incomplete=0, seconds=1.0)

        result, cpu = load_bench.cpu_per_request({"burner": burner.pid, "sleeper": sleeper.pid}, run)
    finally:
        for p in (burner, sleeper):
            p.kill()
            p.wait()
    assert result.requests == 10 and set(cpu) == {"burner", "sleeper", "client"}
    # the burner spent >= 0.4 s of CPU inside the run, 40 ms a request (less one 10 ms clock tick at most);
    # the waiting process next to nothing
    assert cpu["burner"] >= 35.0 and cpu["sleeper"] < 5.0, cpu
    assert cpu["client"] < cpu["burner"], cpu   # the client only waited on a pipe


def test_paired_ratio_is_the_median_of_each_rounds_own_ratio():
    """`--compare-batching --rounds N`: each round's on/off runs are adjacent, so the ratio is taken per round and
    the median kept; a round split by a slow spell (here the third: 2x slower with batching on) does not move it,
    where the ratio of the summed throughputs would."""
    from bench.load_bench import paired_ratio

    median, ratios = paired_ratio([150.0, 300.0, 60.0], [100.0, 200.0, 120.0])
    assert ratios == [1.5, 1.5, 0.5] and median == 1.5
    assert paired_ratio([90.0], [100.0]) == (0.9, [0.9])
    for on, off in (([1.0], [1.0, 2.0]), ([], [])):
        with pytest.raises(ValueError, match="as many runs"):
            paired_ratio(on, off)


def test_bench_load_refuses_fewer_than_one_round(capsys):
    from bench import load_bench

    with pytest.raises(SystemExit) as stop:
        load_bench.main(["--model", "unused.pt", "--compare-batching", "--rounds", "0"])
    assert stop.value.code == 2
    assert "--rounds must be at least 1, got 0" in capsys.readouterr().err
