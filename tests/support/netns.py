"""Virtual hosts on one machine: Linux network namespaces on a private bridge, for multi-host tests.

    root namespace (this test process, the "client": the bridge's address .254)
        │  bridge fq<pid><letter>-br, 10.213.N.0/24 (N picked free at start)
        ├── veth ── namespace fq<pid><letter>-<host> (its own loopback, eth0 = 10.213.N.i, no default route)
        └── ...

Every host is a namespace with its own loopback, ports and routing table, so servers bind
their host's address as they would on a real machine, and faults are cut in the kernel:
`cut(a, b)` adds `prohibit` routes in both hosts' tables (each side is refused at once when it
connects), `cut(a, b, "blackhole", both=False)` makes `a` silent to `b` (b's connections time
out, its calls hang), `link_down(host)` takes the host's interface down (it is unreachable and
its peers hear nothing), `heal`/`link_up` undo them. No namespace has a default route and the
root namespace only holds the bridge's address, so no packet of a test can leave the machine.

A process is started on a host with `ip netns exec NAME ...` (`Host.command`); every process
whose network namespace is a test host is found by `ip netns pids`, so teardown kills them
all by pid, whatever started them (Ray's daemons included), before deleting the namespaces
(and their /run/netns bind mounts), the veth pairs and the bridge. A run killed before its
teardown leaves names with its pid in them; the next run removes those of dead pids.

Needs root (CAP_NET_ADMIN and CAP_SYS_ADMIN) and iproute2: `unavailable_reason()` says why not.
"""
from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import re
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

PREFIX = "fq"  # every name this module creates: fq<owner pid><letter>-..., so stale ones are recognisable
SUBNET_BASE = "10.213"  # 10.213.N.0/24: private, and N is checked free on this machine first
CLIENT_HOST_ID = 254  # the root namespace's address on the bridge
_STALE = re.compile(rf"^{PREFIX}(\d+)[a-z]-")
_networks_made = 0  # per process: each network's names get their own letter


def _ip(*args: str, check: bool = True, netns: str | None = None) -> subprocess.CompletedProcess:
    argv = ["ip", *(("netns", "exec", netns, "ip") if netns else ()), *args]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    if check and done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({done.returncode}): {done.stderr.strip()}")
    return done


def unavailable_reason() -> str | None:
    """Why virtual hosts cannot be made here (None when they can): not root, no iproute2, no netns."""
    if shutil.which("ip") is None:
        return "needs iproute2's `ip` command for network namespaces (apt-get install iproute2)"
    if os.geteuid() != 0:
        return "needs root to create network namespaces, veth pairs and a bridge (CI runs as root)"
    probe = f"{PREFIX}{os.getpid()}-probe"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True, timeout=30)
    if made.returncode != 0:
        return f"`ip netns add` is refused here: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True, timeout=30)
    return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def netns_pids(netns: str) -> list[int]:
    """Pids of every process whose network namespace is `netns`."""
    done = subprocess.run(["ip", "netns", "pids", netns], capture_output=True, text=True, timeout=30)
    return [int(p) for p in done.stdout.split()] if done.returncode == 0 else []


def kill_netns_processes(netns: str, rounds: int = 20) -> None:
    """SIGKILL every process in `netns` (SIGCONT first: a stopped one must not linger), until none is left."""
    for _ in range(rounds):
        pids = netns_pids(netns)
        if not pids:
            return
        for pid in pids:
            for sig in (signal.SIGCONT, signal.SIGKILL):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
        time.sleep(0.1)
    log.warning("processes %s in %s survived SIGKILL", netns_pids(netns), netns)


def remove_stale() -> list[str]:
    """Delete namespaces and links left by runs whose pid is dead (a test process killed before its
    teardown); returns their names. Only names of this module's pattern are touched."""
    removed = []
    names = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=30).stdout.split("\n")
    for name in (line.split()[0] for line in names if line.strip()):
        m = _STALE.match(name)
        if m and not _pid_alive(int(m.group(1))):
            kill_netns_processes(name)
            subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=30)
            removed.append(name)
    links = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True, timeout=30).stdout
    for link in re.findall(r"^\d+: ([^:@\s]+)", links, flags=re.M):
        m = _STALE.match(link)
        if m and not _pid_alive(int(m.group(1))):
            subprocess.run(["ip", "link", "del", link], capture_output=True, timeout=30)
            removed.append(link)
    return removed


def _free_subnet() -> ipaddress.IPv4Network:
    """A 10.213.N.0/24 that no interface of this machine has an address in (N from the pid, then onwards)."""
    used = subprocess.run(["ip", "-o", "-4", "addr", "show"], capture_output=True, text=True, timeout=30).stdout
    taken = {int(n) for n in re.findall(rf"inet {re.escape(SUBNET_BASE)}\.(\d+)\.", used)}
    start = os.getpid() % 250
    for i in range(250):
        n = (start + i) % 250
        if n not in taken:
            return ipaddress.ip_network(f"{SUBNET_BASE}.{n}.0/24")
    raise RuntimeError(f"no free {SUBNET_BASE}.N.0/24 subnet on this machine")


@dataclass
class Host:
    """One virtual host: a network namespace with one address on the bridge."""

    name: str          # the test's name for it ("coord", "node-a0", ...)
    netns: str         # the namespace
    ip: str            # its address
    veth: str          # the root-namespace end of its link (on the bridge)
    index: int

    def command(self, argv) -> list[str]:
        """`argv` as run on this host."""
        return ["ip", "netns", "exec", self.netns, *map(str, argv)]

    def run(self, argv, timeout: float = 120, **kwargs) -> subprocess.CompletedProcess:
        return subprocess.run(self.command(argv), timeout=timeout, **kwargs)

    def popen(self, argv, **kwargs) -> subprocess.Popen:
        return subprocess.Popen(self.command(argv), **kwargs)

    def pids(self) -> list[int]:
        return netns_pids(self.netns)

    def cpu_seconds(self) -> float:
        """CPU time (user + system) of the processes on this host now, with the children they waited for."""
        import psutil

        total = 0.0
        for pid in self.pids():
            try:
                t = psutil.Process(pid).cpu_times()
            except psutil.Error:  # exited meanwhile
                continue
            total += t.user + t.system + t.children_user + t.children_system
        return total


@dataclass
class VirtualNetwork:
    """Hosts on one bridge; every fault made through it is undone by `heal_all()` and `close()`.

    Use as a context manager (or call close()): teardown runs even when the test failed.
    """

    owner: str = ""  # fq<owner>-...: this process's pid and a letter per network it made
    hosts: dict = field(default_factory=dict)
    _cuts: set = field(default_factory=set)          # (host a, host b, kind) with routes in both tables
    _down: set = field(default_factory=set)          # host names whose link is down
    closed: bool = False

    def __post_init__(self):
        global _networks_made
        self.owner = self.owner or f"{os.getpid()}{chr(ord('a') + _networks_made % 26)}"
        _networks_made += 1
        self.stale_removed = remove_stale()
        self.subnet = _free_subnet()
        self.bridge = f"{PREFIX}{self.owner}-br"
        self.client_ip = str(self.subnet.network_address + CLIENT_HOST_ID)
        try:
            _ip("link", "add", self.bridge, "type", "bridge")
            _ip("addr", "add", f"{self.client_ip}/{self.subnet.prefixlen}", "dev", self.bridge)
            _ip("link", "set", self.bridge, "up")
        except Exception:
            self.close()
            raise

    def __enter__(self) -> "VirtualNetwork":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- hosts -----------------------------------------------------------------------------------
    def add_host(self, name: str) -> Host:
        """A new namespace with loopback up and eth0 on the bridge at the next free address."""
        index = len(self.hosts) + 1
        host = Host(name=name, netns=f"{PREFIX}{self.owner}-{name}", ip=str(self.subnet.network_address + index),
                    veth=f"{PREFIX}{self.owner}-{index}", index=index)
        self.hosts[name] = host
        peer = host.veth + "p"
        _ip("netns", "add", host.netns)
        _ip("link", "set", "lo", "up", netns=host.netns)
        _ip("link", "add", host.veth, "type", "veth", "peer", "name", peer)
        _ip("link", "set", peer, "netns", host.netns)
        _ip("link", "set", peer, "name", "eth0", netns=host.netns)
        _ip("addr", "add", f"{host.ip}/{self.subnet.prefixlen}", "dev", "eth0", netns=host.netns)
        _ip("link", "set", "eth0", "up", netns=host.netns)
        _ip("link", "set", host.veth, "master", self.bridge)
        _ip("link", "set", host.veth, "up")
        return host

    def __getitem__(self, name: str) -> Host:
        return self.hosts[name]

    # ---- faults ----------------------------------------------------------------------------------
    def cut(self, a: Host, b: Host, kind: str = "prohibit", both: bool = True) -> None:
        """Cut what `a` sends to `b` (and, when `both`, what `b` sends to `a`) with a route of `kind`.

        The route acts on the sender: a `prohibit` route refuses its host's sends to the peer at once
        (connect: EACCES; the peer hears nothing), a `blackhole` one drops them (connect: EINVAL). So
        `cut(a, b)` is a clean partition where both sides learn of it when they connect, and
        `cut(a, b, "blackhole", both=False)` makes `a` silent to `b`: b's packets still arrive, but
        b's connections to a time out and b's calls on a connection it had hang.
        """
        if kind not in ("prohibit", "blackhole", "unreachable"):
            raise ValueError(f"unknown cut kind {kind!r}")
        _ip("route", "add", kind, f"{b.ip}/32", netns=a.netns)
        if both:
            _ip("route", "add", kind, f"{a.ip}/32", netns=b.netns)
        self._cuts.add((a.name, b.name, kind))

    def heal(self, a: Host, b: Host, kind: str = "prohibit") -> None:
        """Undo `cut(a, b, kind)` (either form)."""
        _ip("route", "del", kind, f"{b.ip}/32", netns=a.netns, check=False)
        _ip("route", "del", kind, f"{a.ip}/32", netns=b.netns, check=False)
        self._cuts.discard((a.name, b.name, kind))

    def link_down(self, host: Host) -> None:
        """Take the host's interface down: it can reach no one and no one reaches it (packets vanish)."""
        _ip("link", "set", "eth0", "down", netns=host.netns)
        self._down.add(host.name)

    def link_up(self, host: Host) -> None:
        _ip("link", "set", "eth0", "up", netns=host.netns)
        # Addresses survive a down/up; routes of the subnet come back with the link.
        self._down.discard(host.name)

    def heal_all(self) -> None:
        """Undo every cut and bring every link up."""
        for a, b, kind in list(self._cuts):
            self.heal(self.hosts[a], self.hosts[b], kind)
        for name in list(self._down):
            self.link_up(self.hosts[name])

    # ---- teardown --------------------------------------------------------------------------------
    def close(self) -> None:
        """Kill every process on every host, delete the namespaces, links and the bridge (idempotent)."""
        if self.closed:
            return
        self.closed = True
        for host in self.hosts.values():
            kill_netns_processes(host.netns)
        for host in self.hosts.values():
            subprocess.run(["ip", "netns", "del", host.netns], capture_output=True, timeout=30)
            subprocess.run(["ip", "link", "del", host.veth], capture_output=True, timeout=30)  # gone with the ns
        subprocess.run(["ip", "link", "del", self.bridge], capture_output=True, timeout=30)

    def leftovers(self) -> list[str]:
        """Names of this network still present on the machine (empty after close())."""
        names = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=30).stdout
        links = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True, timeout=30).stdout
        mine = f"{PREFIX}{self.owner}-"
        found = [line.split()[0] for line in names.splitlines() if line.startswith(mine)]
        found += [m for m in re.findall(r"^\d+: ([^:@\s]+)", links, flags=re.M) if m.startswith(mine)]
        found += [p for p in os.listdir("/run/netns") if p.startswith(mine)] if os.path.isdir("/run/netns") else []
        return sorted(set(found))
