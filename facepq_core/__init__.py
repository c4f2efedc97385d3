"""facepq's foundation: what every component imports and which imports none of them.

errors (the FacepqError tree), digest (file hashing), codes (the layout of a code:
CodeSpec, packing, the reference score), atomic (durable file writes), redact (URLs
without secrets), routing (face id -> shard), codecs (registered code types: encode,
query tables). numpy and the standard library only: no torch, no gRPC, no Ray.
"""
