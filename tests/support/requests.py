"""Request messages the tests send."""
from __future__ import annotations

import numpy as np


def embedding_request(gallery, top_k=10, which=0):
    from facepq_proto.facepq.v1 import facepq_pb2

    values = list(gallery["embeddings"].values())[which]
    return facepq_pb2.SearchRequest(embedding=facepq_pb2.Embedding(values=np.asarray(values).tolist()), top_k=top_k)
