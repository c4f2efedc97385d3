"""The clients of a multi-host run: searchers and one writer, every call recorded in a History.

* Searchers (threads) search by one fixed embedding with top_k = MAX_TOP_K, larger than the whole
  gallery, so every answer is the full content of the version it names (the checker compares it to
  the commit log) and photos play no part.
* The writer enrols new people (photos drawn by opqn_model.synthetic, one person per enrolment) and
  deletes people whose enrolment was acknowledged (and people of the ingested gallery), in a seeded
  order, one call at a time.

Outcomes: a search reply is OK, any search error FAIL (reads change nothing). A write reply is OK;
a delete answered NOT_FOUND is FAIL (nothing was deleted); every other write error is INFO: the
commit may or may not have happened (a timeout, or a coordinator cut off after committing).
"""
from __future__ import annotations

import io
import random
import threading

import grpc
import numpy as np

from facepq_proto.facepq.v1 import facepq_pb2, facepq_pb2_grpc
from query_node.wire import MAX_TOP_K
from tests.support.history import History, Hit

SEARCH_TIMEOUT = 20.0   # the client's deadline; the coordinator's own search timeout is 5 s
WRITE_TIMEOUT = 30.0


def enrolment_photos(people: int, photos: int, seed: int) -> list[tuple[str, list[bytes]]]:
    """[(person, [PNG bytes])]: synthetic people nobody has seen (`enrolee-000`, ...)."""
    from PIL import Image

    from opqn_model.synthetic import generate_faces

    images, _ = generate_faces(people, photos, size=64, seed=seed)
    out = []
    for p in range(people):
        pngs = []
        for image in images[p * photos:(p + 1) * photos]:
            buf = io.BytesIO()
            Image.fromarray(image).save(buf, format="PNG")
            pngs.append(buf.getvalue())
        out.append((f"enrolee-{p:03d}", pngs))
    return out


def _error(exc: grpc.RpcError) -> str:
    return f"{exc.code().name}: {exc.details()}"


class Workload:
    """Searchers and a writer against one coordinator, recording into `history` until `stop()`.

    Args:
        channel: to the coordinator.
        embedding: float32 [E], the query of every search.
        enrolees: enrolment_photos(); enrolled in this order.
        gallery_people: names already in the index, deleted now and then.
        seed: the writer's choices.
        searchers: search threads.
        write_pause: seconds between two writes.
        search_pause: seconds between two searches of one searcher. At 0.05 three searchers made ~32
            searches/s (top_k 1000 each) and with the servers kept both cores of the CI machine busy for the
            whole run; at 0.2 they make ~10/s, still dozens within every fault.
    """

    def __init__(self, history: History, channel: grpc.Channel, embedding: np.ndarray, enrolees, gallery_people,
                 seed: int = 0, searchers: int = 2, write_pause: float = 0.5, search_pause: float = 0.2):
        self.history, self.stub = history, facepq_pb2_grpc.CoordinatorStub(channel)
        self.request = facepq_pb2.SearchRequest(embedding=facepq_pb2.Embedding(values=embedding.tolist()),
                                                top_k=MAX_TOP_K)
        self.enrolees = list(enrolees)
        self.gallery_people = list(gallery_people)
        self.rng = random.Random(seed)
        self.write_pause, self.search_pause = write_pause, search_pause
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._search_loop, name=f"searcher-{i}", daemon=True)
                         for i in range(searchers)]
        self._threads.append(threading.Thread(target=self._write_loop, name="writer", daemon=True))
        self.errors: list[str] = []  # client-side exceptions other than RPC errors (a defect of the test)

    # ---- searches ----------------------------------------------------------------------------------
    def search_once(self):
        op = self.history.invoke("search", top_k=MAX_TOP_K)
        try:
            reply = self.stub.Search(self.request, timeout=SEARCH_TIMEOUT)
        except grpc.RpcError as exc:
            return op.fail(_error(exc))
        return op.ok(version=int(reply.index_version) if reply.index_version else None, complete=reply.complete,
                     missing_shards=tuple(reply.missing_shards),
                     hits=tuple(Hit(int(h.face_id), h.person, int(h.shard)) for h in reply.hits))

    def _search_loop(self):
        while not self._stop.is_set():
            try:
                self.search_once()
            except Exception as exc:  # noqa: BLE001 - recorded, and the test fails on it
                self.errors.append(f"search: {exc!r}")
            self._stop.wait(self.search_pause)

    # ---- writes ------------------------------------------------------------------------------------
    def enrol(self, person: str, photos: list[bytes]):
        op = self.history.invoke("enrol", person=person)
        request = facepq_pb2.EnrolRequest(person=person, photos=[
            facepq_pb2.Photo(content=p, source=f"{person}/{i}.png") for i, p in enumerate(photos)])
        try:
            reply = self.stub.Enrol(request, timeout=WRITE_TIMEOUT)
        except grpc.RpcError as exc:
            return op.info(_error(exc))
        return op.ok(face_ids=tuple(int(f) for f in reply.face_ids), version=int(reply.index_version))

    def delete(self, person: str):
        op = self.history.invoke("delete", person=person)
        try:
            reply = self.stub.Delete(facepq_pb2.DeleteRequest(person=person), timeout=WRITE_TIMEOUT)
        except grpc.RpcError as exc:
            return op.fail(_error(exc)) if exc.code() == grpc.StatusCode.NOT_FOUND else op.info(_error(exc))
        return op.ok(version=int(reply.index_version))

    def _write_loop(self):
        """Enrol, enrol, delete, ...: the delete takes an acknowledged enrolee (oldest first) or, one time
        in three, a gallery person; people are never enrolled twice, so names identify enrolments."""
        enrolled: list[str] = []
        steps = 0
        while not self._stop.is_set():
            try:
                if steps % 3 == 2 and (enrolled or self.gallery_people):
                    if self.gallery_people and (not enrolled or self.rng.random() < 1 / 3):
                        person = self.gallery_people.pop(self.rng.randrange(len(self.gallery_people)))
                    else:
                        person = enrolled.pop(0)
                    self.delete(person)
                elif self.enrolees:
                    person, photos = self.enrolees.pop(0)
                    if self.enrol(person, photos).outcome == "ok":
                        enrolled.append(person)
            except Exception as exc:  # noqa: BLE001 - recorded, and the test fails on it
                self.errors.append(f"write: {exc!r}")
            steps += 1
            self._stop.wait(self.write_pause)

    # ---- control -----------------------------------------------------------------------------------
    def start(self) -> "Workload":
        for t in self._threads:
            t.start()
        return self

    def stop(self, timeout: float = 60) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout)
