"""The virtual-host harness (tests.support.netns) does what the multi-host suite relies on: hosts reach each
other over the bridge, each kind of cut has the effect it claims and heals, and teardown leaves no
namespace, link or process behind, also after a run that died before its teardown."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from tests.support import netns

pytestmark = pytest.mark.timeout(120)

SERVER = """
import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], 9000)); s.listen(); print("up", flush=True)
while True:
    c, _ = s.accept(); c.sendall(b"hi"); c.close()
"""
CLIENT = """
import socket, sys
try:
    print(socket.create_connection((sys.argv[1], 9000), timeout=float(sys.argv[2])).recv(2).decode())
except OSError as exc:
    print(type(exc).__name__, exc.errno)
"""


@pytest.fixture
def net():
    reason = netns.unavailable_reason()
    if reason:
        pytest.skip(reason)
    with netns.VirtualNetwork() as network:
        yield network
    assert network.leftovers() == []


def _serve(host):
    server = host.popen([sys.executable, "-c", SERVER, host.ip], stdout=subprocess.PIPE, text=True)
    assert server.stdout.readline().strip() == "up"
    return server


def _connect(host, ip, timeout=1.0) -> str:
    """What a connection from `host` (None: the test process) to ip:9000 gets: 'hi' or the error and errno."""
    argv = [sys.executable, "-c", CLIENT, ip, str(timeout)]
    done = host.run(argv, capture_output=True, text=True) if host else subprocess.run(argv, capture_output=True,
                                                                                       text=True, timeout=60)
    return done.stdout.strip() or done.stderr


def test_hosts_reach_each_other_and_each_cut_does_what_it_says_until_healed(net):
    a, b, c = net.add_host("a"), net.add_host("b"), net.add_host("c")
    _serve(b)
    _serve(a)
    assert _connect(a, b.ip) == "hi" and _connect(None, b.ip) == "hi"  # host to host, and the test process

    net.cut(a, b)  # prohibit, both ways: refused at once on each side
    assert _connect(a, b.ip) == "PermissionError 13" and _connect(b, a.ip) == "PermissionError 13"
    assert _connect(c, b.ip) == "hi"  # only that pair is cut
    net.heal(a, b)
    assert _connect(a, b.ip) == "hi" and _connect(b, a.ip) == "hi"

    net.cut(b, a, "blackhole", both=False)  # b silent to a: a's connection attempts time out
    assert _connect(a, b.ip) == "TimeoutError None"
    net.heal(b, a, "blackhole")
    assert _connect(a, b.ip) == "hi"

    net.link_down(b)  # no one reaches b, b reaches no one
    assert _connect(a, b.ip) == "TimeoutError None" and _connect(None, b.ip) == "TimeoutError None"
    assert _connect(b, a.ip) == "OSError 101"  # network unreachable
    net.link_up(b)
    assert _connect(a, b.ip) == "hi" and _connect(b, a.ip) == "hi"

    net.cut(a, c)
    net.link_down(c)
    net.heal_all()
    assert _connect(a, c.ip) == "ConnectionRefusedError 111"  # reached: c just serves nothing
    assert _connect(c, b.ip) == "hi" and _connect(a, b.ip) == "hi"


def test_close_kills_every_process_on_the_hosts_and_removes_everything(net):
    a = net.add_host("a")
    running = a.popen(["sleep", "600"])
    stopped = a.popen(["sleep", "600"])
    forked = a.popen(["sh", "-c", "sleep 600 & sleep 600 & wait"])  # grandchildren the test never saw
    deadline = time.monotonic() + 30
    while len(a.pids()) < 5 and time.monotonic() < deadline:  # each is on the host once `ip netns exec` is done
        time.sleep(0.1)
    assert len(a.pids()) == 5
    os.kill(stopped.pid, signal.SIGSTOP)  # a stopped process must not survive either
    net.close()
    for p in (running, stopped, forked):
        assert p.wait(10) == -9
    assert net.leftovers() == [] and a.pids() == []


def test_names_left_by_a_run_that_died_are_removed_by_the_next(net):
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = netns.VirtualNetwork(owner=f"{dead.pid}z")  # as if made by the process that just exited
    host = stale.add_host("x")
    orphan = host.popen(["sleep", "600"])
    assert stale.leftovers()
    fresh = netns.VirtualNetwork()
    try:
        assert host.netns in fresh.stale_removed and stale.bridge in fresh.stale_removed
        assert orphan.wait(10) == -9
        assert stale.leftovers() == []
    finally:
        fresh.close()
        stale.close()
