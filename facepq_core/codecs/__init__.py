"""Code types (codecs), registered by name like trunks are.

A codec is everything after the trunk's embedding, in numpy, in eval mode: how a face's
embedding becomes its stored code (`encode`), how a query's embedding becomes the
lookup tables a query node scans with (`query_tables`), and the code's layout
(`spec`: sub-codes M, values per sub-code K, bytes per face). Query nodes only need
the layout and the scan kernel family (`kernel`), by name; the coordinator, the
ingest job and evaluation need the codec itself, built from a checkpoint by the
training method that made it (opqn_model.methods). Torch is only for training.

To add a code type: a module here with a `Codec` subclass decorated with
`@register_codec` (name it in `_CODEC_MODULES`), its tests, and a kernel in
query_node if none of the existing families serves it.

    from facepq_core.codecs import codec_class, codec_from_state
    codec = codec_from_state("opqn", state)        # state: codec.state()
    codes = codec.encode(embeddings)               # uint8 [N, codec.spec.code_bytes]
    tables = codec.query_tables(embeddings)        # float32 [N, M, K]; score = sum_m tables[m, c_m]
"""
from facepq_core.codecs.base import (
    KERNELS,
    MAX_EMBEDDING_VALUE,
    Codec,
    check_embeddings,
    codec_class,
    codec_from_state,
    list_codecs,
    register_codec,
)

__all__ = ["Codec", "KERNELS", "MAX_EMBEDDING_VALUE", "check_embeddings", "codec_class", "codec_from_state",
           "list_codecs", "register_codec"]
