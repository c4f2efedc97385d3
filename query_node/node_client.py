"""The coordinator's calls to query nodes over gRPC, behind the small interface the fan-out uses.

`NodeClients` is what query_node.coordinator.Coordinator needs from a transport:
`prepare(lookup_tables, refine)` once per search (the tables, and a two-stage search's
refinement tables and candidates, in wire form, reused by every node call of that search), `search(address, prepared, k, shards, index_version,
timeout) -> fanout.NodeReply` or `fanout.NodeCallError`, and `close()`. Tests drive
the coordinator with fake clients that answer from memory; `GrpcNodeClients` is the
real one: one cached channel per node, TLS and the node token when configured.
"""
from __future__ import annotations

import logging
import secrets
import threading
from collections.abc import Sequence
from typing import Protocol

import grpc
import numpy as np

from facepq_proto.facepq.v1 import facepq_pb2, facepq_pb2_grpc
from query_node.fanout import NodeCallError, NodeReply
from query_node.security import (
    NONCE_HEADER,
    PROOF_HEADER,
    bearer_metadata,
    make_channel,
    node_bearer,
    node_reply_key,
    proof_matches,
)
from query_node.wire import MAX_MESSAGE_BYTES, table_message

log = logging.getLogger(__name__)


class NodeClients(Protocol):
    def prepare(self, lookup_tables: np.ndarray, refine: tuple[np.ndarray, int] | None = None,
                with_codes: bool = False, nprobe: int = 0) -> object:
        """float32 [Q, M, K] (and a two-stage search's (refinement tables [Q, a, b], candidates per shard), and
        the cells to scan on a partitioned index, 0 = all) -> what `search` sends (built once per search).
        `with_codes`: hits carry their stored codes."""

    def search(self, address: str, tables: object, k: int, shards: Sequence[int], index_version: str,
               timeout: float) -> NodeReply:
        """Ask one node for its top-k over `shards`; raises NodeCallError when the call fails."""

    def close(self) -> None:
        ...


class GrpcNodeClients:
    """NodeClients over gRPC.

    Args:
        tls: query_node.security.ClientTls for the node channels (None = plaintext).
        node_token: the node token: `node_bearer(token)` goes as `authorization: Bearer` on every call, and
            every reply must carry the node's proof of the token (query_node.security), else it is refused.
        max_message_bytes: send/receive limit of the channels.
    """

    def __init__(self, tls=None, node_token: str | None = None, max_message_bytes: int = MAX_MESSAGE_BYTES):
        self.tls = tls
        # Never the token itself: a derived bearer, and every reply must prove the node holds the token.
        self.metadata = bearer_metadata(node_bearer(node_token)) if node_token else ()
        self.reply_key = node_reply_key(node_token) if node_token else None
        self.max_message_bytes = max_message_bytes
        self._refused: set[str] = set()  # nodes already logged for failing authentication
        self._channels: dict = {}
        self._lock = threading.Lock()

    def _stub(self, address: str):
        with self._lock:
            if address not in self._channels:
                opts = [("grpc.max_receive_message_length", self.max_message_bytes),
                        ("grpc.max_send_message_length", self.max_message_bytes)]
                channel = make_channel(address, self.tls, opts)
                self._channels[address] = (channel, facepq_pb2_grpc.QueryNodeStub(channel))
            return self._channels[address][1]

    def prepare(self, lookup_tables: np.ndarray, refine: tuple[np.ndarray, int] | None = None,
                with_codes: bool = False, nprobe: int = 0) -> dict:
        fields = {"tables": [table_message(facepq_pb2, t) for t in lookup_tables]}
        if with_codes:
            fields["with_codes"] = True
        if nprobe:
            fields["nprobe"] = int(nprobe)
        if refine is not None:
            fields.update(refine_tables=[table_message(facepq_pb2, t) for t in refine[0]], refine_candidates=refine[1])
        return fields

    def search(self, address: str, tables: dict, k: int, shards: Sequence[int], index_version: str,
               timeout: float) -> NodeReply:
        request = facepq_pb2.NodeSearchRequest(**tables, top_k=k, shards=shards, index_version=index_version)
        nonce = secrets.token_hex(16) if self.reply_key else None
        metadata = self.metadata + (((NONCE_HEADER, nonce),) if nonce else ())
        try:
            reply, call = self._stub(address).Search.with_call(request, timeout=timeout, metadata=metadata)
        except grpc.RpcError as exc:
            code = exc.code().name if exc.code() else "UNKNOWN"
            raise NodeCallError(code, exc.details()) from exc
        if nonce:
            self._check_proof(address, nonce, reply, call)
        # The hits stay messages: the merge converts only the k it keeps.
        return NodeReply(version=int(reply.index_version or 0), shards=list(reply.shards_searched),
                         results=[r.hits for r in reply.results], scan_ms=reply.scan_ms)

    def _check_proof(self, address: str, nonce: str, reply, call) -> None:
        """Refuse (as a failed call: another replica is asked) a reply its node did not sign with the node token."""
        proofs = next((v for k, v in call.trailing_metadata() or () if k == PROOF_HEADER), "")
        if proof_matches(self.reply_key, nonce, reply.SerializeToString(deterministic=True), proofs):
            return
        if address not in self._refused:
            self._refused.add(address)
            log.error("query node %s answered without a valid proof of the node token: its hits are ignored "
                      "(a node with another token, or not a facepq node of this cluster)", address)
        raise NodeCallError("UNAVAILABLE", f"node {address} did not prove it holds the node token; answer ignored")

    def close(self) -> None:
        with self._lock:
            channels, self._channels = list(self._channels.values()), {}
        for channel, _ in channels:
            channel.close()
