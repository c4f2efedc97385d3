"""What the coordinator has learnt about each node from its own calls: latency, and recent failures.

Pure bookkeeping (the caller passes the clock), used for three decisions of a search:
* routing: replicas are tried healthiest first; a node that failed or hung recently is tried last, until
  its penalty expires (then one search probes it: an answer clears it, another failure doubles the penalty,
  up to MAX_PENALTY_S), so a hung replica stops costing searches after its first timeout;
* hedging: a call still unanswered after `hedge_after(address)` (a few times the node's usual latency) is
  sent to a second replica as well, and the first answer wins;
* per-node timeouts: a call still unanswered after `node_timeout` seconds counts as failed and its shards
  go to another replica, well before the request's own deadline.
"""
from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass

BASE_PENALTY_S = 2.0
MAX_PENALTY_S = 30.0
HEDGE_FACTOR = 3.0        # hedge after this many times a node's usual latency...
MIN_HEDGE_S = 0.05        # ...but never sooner (a fast node's jitter is not a hang)
DEFAULT_LATENCY_S = 0.05  # what a node is assumed to take before it has answered once
LATENCY_WEIGHT = 0.2      # exponential moving average


@dataclass
class _State:
    latency: float = DEFAULT_LATENCY_S
    failures: int = 0
    penalised_until: float = 0.0


class NodeHealth:
    """Per-address latency and failure penalties; thread-safe (searches run concurrently).

    Args:
        node_timeout: seconds after which an unanswered call counts as failed (when another replica exists).
    """

    def __init__(self, node_timeout: float = 1.0):
        self.node_timeout = node_timeout
        self._nodes: dict[str, _State] = {}
        self._lock = threading.Lock()

    def _state(self, address: str) -> _State:
        state = self._nodes.get(address)
        if state is None:
            state = self._nodes[address] = _State()
        return state

    def answered(self, address: str, seconds: float) -> None:
        """A call answered after `seconds`: the node is healthy again, its latency estimate moves."""
        with self._lock:
            state = self._state(address)
            state.latency += LATENCY_WEIGHT * (seconds - state.latency)
            state.failures, state.penalised_until = 0, 0.0

    def failed(self, address: str, now: float) -> None:
        """A call failed or timed out: avoid the node for a penalty that doubles with each failure in a row."""
        with self._lock:
            state = self._state(address)
            state.failures += 1
            state.penalised_until = now + min(MAX_PENALTY_S, BASE_PENALTY_S * 2 ** (state.failures - 1))

    def penalised(self, address: str, now: float) -> bool:
        with self._lock:
            state = self._nodes.get(address)
            return state is not None and state.penalised_until > now

    def order(self, addresses: Sequence[str], now: float) -> list[str]:
        """`addresses` with the penalised ones moved to the end (stable: the caller's rotation is kept)."""
        return sorted(addresses, key=lambda a: self.penalised(a, now))

    def hedge_after(self, address: str) -> float:
        """Seconds to wait for `address` before asking a second replica too."""
        with self._lock:
            latency = self._state(address).latency
        return min(max(MIN_HEDGE_S, HEDGE_FACTOR * latency), self.node_timeout)
