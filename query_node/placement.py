"""Shard placement: which shards each query node serves (one formula for the local launcher and Kubernetes).

The S x R replica slots s*R + r (shard s, copy r < R) are dealt round-robin over the N
nodes, so node i serves shard s when (i - s*R) mod N < R. Every shard is on R distinct
nodes (R <= N), every node gets floor or ceil of S*R/N shards, none is empty while
N <= S*R. With N = S and R = 1 node i serves shard i; with R = N every node serves
every shard. `facepq.launcher.LocalCluster` and the StatefulSet in deploy/k8s (which
runs `python -m query_node.placement` with the pod's ordinal) both call `assign_shards`.
"""
from __future__ import annotations

import argparse
import sys

from facepq_core.errors import ConfigError


def assign_shards(shard_count: int, nodes: int, replicas: int = 1) -> list[list[int]]:
    """Shards served by each node: node i serves shard s when (i - s * replicas) mod nodes < replicas.

    Returns
    -------
    list of `nodes` sorted shard lists; every shard is on exactly `replicas` distinct nodes and
    the nodes' shard counts differ by at most one.
    """
    if shard_count < 1 or nodes < 1:
        raise ConfigError(f"need at least one shard and one node, got {shard_count} shards, {nodes} nodes")
    if not 1 <= replicas <= nodes:
        raise ConfigError(f"replicas must be between 1 and the node count ({nodes}), got {replicas}")
    out = [[s for s in range(shard_count) if (i - s * replicas) % nodes < replicas] for i in range(nodes)]
    if any(not shards for shards in out):
        raise ConfigError(f"{nodes} nodes x {replicas} replicas over {shard_count} shards leaves a node without "
                          f"shards; use at most {shard_count * replicas} nodes")
    return out


def main(argv: list[str] | None = None) -> int:
    """`python -m query_node.placement SHARDS NODES REPLICAS ORDINAL`: print node ORDINAL's shards as 0,1,..."""
    p = argparse.ArgumentParser(prog="python -m query_node.placement", description=main.__doc__)
    for name in ("shards", "nodes", "replicas", "ordinal"):
        p.add_argument(name, type=int)
    args = p.parse_args(argv)
    try:
        plan = assign_shards(args.shards, args.nodes, args.replicas)
        if not 0 <= args.ordinal < args.nodes:
            raise ConfigError(f"ordinal {args.ordinal} is outside 0..{args.nodes - 1}")
    except ConfigError as exc:
        print(f"placement: error: {exc}", file=sys.stderr)
        return 2
    print(",".join(map(str, plan[args.ordinal])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
