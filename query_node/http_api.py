"""The coordinator's HTTP/JSON API and web page: a thin FastAPI shell over query_node.service.CoordinatorService.

    facepq coordinator ... --http-port 8080
    curl -F photo=@face.jpg -F k=5 http://127.0.0.1:8080/v1/search

The same service as the gRPC servicer (query_node.coordinator_server), so both answer alike:
the same JSON as `facepq search --json` (query_node.json_form), the same bearer tokens
(`Authorization: Bearer <token>`; mutating calls always, the others with --auth-search), and the
same status for every refusal: each facepq_core.errors class names a google.rpc code and
`HTTP_STATUS` maps it (400 bad input or no face, 401 no token, 404 unknown person, 409 a name in
use, 503 busy, ...). The body of a refusal is {"error": {"status": "NOT_FOUND", "message": ...}}.
One exception: a request body over the 16 MiB message limit is 413 (gRPC answers
RESOURCE_EXHAUSTED, which the map makes 429 "retry later": wrong for a request too large to ever
pass). FastAPI's own validation errors (a form field that is not a number) are 400 INVALID_ARGUMENT.

Routes (OpenAPI document at /openapi.json, interactive at /docs):

    GET  /                       the web page (query_node/web/index.html)
    GET  /v1/status              cluster status (nodes, shards, versions, calibration)
    POST /v1/search              multipart: photo, k, far | threshold, group_by, faces_per_person, all_faces
    POST /v1/search/embedding    JSON: {"embedding": [...], "k": 10, ...the same options}
    POST /v1/verify              multipart: photo_a, photo_b | person, far | threshold
    POST /v1/enrol               multipart: person, photos (repeated), all_faces
    GET  /v1/people              ?page_size=&page_token=&contains=
    GET  /v1/people/faces        ?person=NAME
    POST /v1/people/rename       JSON {"person", "new_name"}
    POST /v1/people/merge        JSON {"people": [...], "into"}
    POST /v1/people/move         JSON {"face_ids": [...], "person"}
    POST /v1/delete              JSON {"person"} or {"face_ids": [...]}
    POST /v1/compact             JSON {"grace_seconds"}
    GET  /v1/thumbnail           ?source=PATH: a small JPEG of a gallery photo under a --thumbnail-root
"""
import io
import logging
import math
import os
import pathlib
import time

from fastapi import Body, FastAPI, File, Form, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from pydantic import BaseModel

from facepq_core.errors import HTTP_STATUS, FacepqError, InvalidRequest, NotFound, Overloaded
from query_node import metrics
from query_node.json_form import search_json
from query_node.service import CoordinatorService, Photo, SearchOptions
from query_node.wire import MAX_MESSAGE_BYTES

log = logging.getLogger(__name__)

WEB_PAGE = pathlib.Path(__file__).with_name("web") / "index.html"
THUMBNAIL_PX = 160
_OPEN_PATHS = ("/", "/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc", "/favicon.ico")
_MUTATING = {"/v1/enrol", "/v1/people/rename", "/v1/people/merge", "/v1/people/move", "/v1/delete", "/v1/compact"}


def _error(status: str, message: str, code: int | None = None) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if status == "UNAUTHENTICATED" else None
    return JSONResponse({"error": {"status": status, "message": message}}, status_code=code or HTTP_STATUS[status],
                        headers=headers)


class _BodyLimit:
    """ASGI middleware: a request body over `limit` bytes is answered 413 before the app reads it."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length")
        too_large = _error("RESOURCE_EXHAUSTED", f"the request is over the {self.limit >> 20} MiB limit", 413)
        if length is not None and length.isdigit() and int(length) > self.limit:
            return await too_large(scope, receive, send)
        seen = 0

        async def counted():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise _TooLarge()
            return message

        try:
            return await self.app(scope, counted, send)
        except _TooLarge:
            return await too_large(scope, receive, send)


class _TooLarge(Exception):
    pass


# ---- the JSON bodies -------------------------------------------------------------------------------
class EmbeddingSearch(BaseModel):
    """POST /v1/search/embedding: a trunk embedding and the search options of /v1/search."""

    embedding: list[float] | None = None
    k: int = 10
    far: float | None = None
    threshold: float | None = None
    group_by: str = "face"
    faces_per_person: int = 0
    candidates: int | None = None  # refinement tier: candidates re-scored per shard (None: 100; 0: first pass)


class Rename(BaseModel):
    person: str
    new_name: str


class Merge(BaseModel):
    people: list[str]
    into: str


class Move(BaseModel):
    face_ids: list[str]
    person: str


class Delete(BaseModel):
    person: str | None = None
    face_ids: list[str] | None = None


class Compact(BaseModel):
    grace_seconds: float | None = None


def build_app(service: CoordinatorService, tokens=(), auth_search: bool = False, thumbnail_roots=()):
    """The FastAPI app of a coordinator service.

    Args:
        tokens: accepted bearer tokens (none: no authentication).  auth_search: require one for reads too.
        thumbnail_roots: folders whose photos /v1/thumbnail may show (none: thumbnails are off).
    """
    from query_node.security import token_matches

    roots = [pathlib.Path(r).resolve() for r in thumbnail_roots]
    app = FastAPI(title="facepq", version="1", description="Face search over product-quantization codes: search, "
                  "verify, enrol, people. The same service and statuses as the gRPC API (proto/facepq/v1).")

    @app.exception_handler(FacepqError)
    async def _facepq_error(request, exc: FacepqError):
        response = _error(exc.status, str(exc))
        if isinstance(exc, Overloaded):  # the photo gate's advice, as gRPC sends it in grpc-retry-pushback-ms
            response.headers["Retry-After"] = str(max(1, math.ceil(exc.retry_after_ms / 1000)))
        return response

    @app.exception_handler(Exception)
    async def _unexpected(request, exc: Exception):
        log.exception("HTTP %s %s failed", request.method, request.url.path)
        return _error("INTERNAL", f"internal error ({type(exc).__name__}); the coordinator's log has the details")

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request, exc: RequestValidationError):
        problems = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ())[1:])}: {e.get('msg')}" for e in exc.errors())
        return _error("INVALID_ARGUMENT", f"bad request: {problems}")

    @app.middleware("http")
    async def _auth_and_metrics(request: Request, call_next):
        t0 = time.perf_counter()
        path = request.url.path
        needs_token = tokens and (path in _MUTATING or (auth_search and path not in _OPEN_PATHS))
        if needs_token and not token_matches(request.headers.get("authorization", ""), list(tokens)):
            log.warning("refused an unauthenticated HTTP call to %s", path)
            response = _error("UNAUTHENTICATED", "this call needs a valid token: send 'Authorization: Bearer <token>'")
        else:
            response = await call_next(request)
        route = request.scope.get("route")
        metrics.record_request("coordinator", "http", getattr(route, "path", "unmatched"), str(response.status_code),
                               time.perf_counter() - t0)
        return response

    def options(far, threshold, group_by, faces_per_person, all_faces=False, min_face_px=0,
                candidates=None) -> SearchOptions:
        return SearchOptions(far=far, threshold=threshold, group_by=group_by, refine_candidates=candidates,
                             faces_per_person=faces_per_person or SearchOptions.faces_per_person,
                             faces="all" if all_faces else "largest",
                             min_face_px=min_face_px or SearchOptions.min_face_px)

    def search_reply(query, name: str, k: int, opts: SearchOptions) -> dict:
        t0 = time.perf_counter()
        result = service.search(query, k, opts)
        return search_json(result, name, (time.perf_counter() - t0) * 1e3)

    # ---- routes -------------------------------------------------------------------------------
    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def web_page():
        return HTMLResponse(WEB_PAGE.read_text(encoding="utf-8"))

    @app.get("/v1/status", summary="Cluster status: index version, nodes, shards without a node, calibration")
    def status():
        s = service.status()
        cal = s.calibration
        return {"index_version": s.index_version, "shard_count": s.shard_count, "model_fingerprint": s.model_fingerprint,
                "uncovered_shards": s.uncovered_shards, "complete": not s.uncovered_shards,
                "nodes": [{"node_id": n.node_id, "address": n.address, "shards": list(n.shards),
                           "index_version": n.index_version, "healthy": n.healthy} for n in s.nodes],
                "calibrated": cal is not None,
                "operating_points": [{"far": p.far, "threshold": p.threshold, "tar": p.tar}
                                     for p in (cal.operating_points if cal else ())],
                "thumbnails": bool(roots)}

    @app.post("/v1/search", summary="Search with a photo (multipart)")
    def search_photo(photo: UploadFile = File(..., description="the query photo (JPEG/PNG/...)"),
                     k: int = Form(10, description="hits (or people with group_by=person), 1..1000"),
                     far: float | None = Form(None, description="operating point: per-comparison false-accept rate"),
                     threshold: float | None = Form(None, description="operating point: a raw score"),
                     group_by: str = Form("face", description="face or person"),
                     faces_per_person: int = Form(0), all_faces: bool = Form(False), min_face_px: int = Form(0),
                     candidates: int | None = Form(None, description="refinement tier: candidates re-scored per "
                                                                     "shard (default 100; 0: the first pass alone)")):
        return search_reply(photo.file.read(), photo.filename or "photo", k,
                            options(far, threshold, group_by, faces_per_person, all_faces, min_face_px, candidates))

    @app.post("/v1/search/embedding", summary="Search with a trunk embedding (JSON)")
    def search_embedding(body: EmbeddingSearch):
        return search_reply(body.embedding, "embedding", body.k,
                            options(body.far, body.threshold, body.group_by, body.faces_per_person,
                                    candidates=body.candidates))

    @app.post("/v1/verify", summary="1:1: photo_a against photo_b or an enrolled person")
    def verify(photo_a: UploadFile = File(...), photo_b: UploadFile | None = File(None),
               person: str | None = Form(None), far: float | None = Form(None),
               threshold: float | None = Form(None)):
        r = service.verify(photo_a.file.read(), photo_b.file.read() if photo_b is not None else None,
                           person_b=person, far=far, threshold=threshold)
        return {"same": r.same, "score": r.score, "similarity": r.similarity, "threshold": r.threshold, "far": r.far,
                "best_face_id": str(r.best_face_id), "faces_compared": r.faces_compared}

    @app.post("/v1/enrol", summary="Enrol a person's photos (multipart; needs the token)")
    def enrol(person: str = Form(...), photos: list[UploadFile] = File(default=[]), all_faces: bool = Form(False),
              min_face_px: int = Form(0)):
        r = service.enrol(person, [Photo(p.file.read(), p.filename or "") for p in photos],
                          faces="all" if all_faces else "largest", min_face_px=min_face_px or SearchOptions.min_face_px)
        return {"person": person, "face_ids": [str(i) for i in r.face_ids], "skipped": r.skipped,
                "index_version": r.index_version, "boxes": [list(b) for b in r.boxes]}

    @app.get("/v1/people", summary="People with their face counts, a page at a time")
    def people(page_size: int = Query(0), page_token: str = Query(""), contains: str = Query("")):
        page = service.list_people(page_size, page_token, contains)
        return {"people": [{"person": p.person, "faces": p.faces, "shards": p.shards} for p in page.people],
                "next_page_token": page.next_page_token, "total": page.total}

    @app.get("/v1/people/faces", summary="A person's faces")
    def person_faces(person: str = Query(...)):
        found = service.person_faces(person)
        return {"person": found.person,
                "faces": [{"face_id": str(f.face_id), "source": f.source, "shard": f.shard} for f in found.faces]}

    @app.post("/v1/people/rename", summary="Rename a person (needs the token)")
    def rename(body: Rename):
        return _change(service.rename_person(body.person, body.new_name))

    @app.post("/v1/people/merge", summary="Merge people into one (needs the token)")
    def merge(body: Merge):
        return _change(service.merge_people(body.people, body.into))

    @app.post("/v1/people/move", summary="Move faces to another person (needs the token)")
    def move(body: Move):
        return _change(service.move_faces(_face_ids(body.face_ids), body.person))

    @app.post("/v1/delete", summary="Delete a person or faces (needs the token)")
    def delete(body: Delete = Body(...)):
        r = service.delete(person=body.person, face_ids=None if body.face_ids is None else _face_ids(body.face_ids))
        return {"deleted": r.deleted, "index_version": r.index_version}

    @app.post("/v1/compact", summary="Remove deleted faces from disk (needs the token)")
    def compact(body: Compact = Body(Compact())):
        r = service.compact(body.grace_seconds)
        return {"index_version": r.index_version, "rows_removed": r.rows_removed,
                "segments_rewritten": r.segments_rewritten, "files_deleted": r.files_deleted,
                "bytes_freed": r.bytes_freed}

    @app.get("/v1/thumbnail", summary="A small JPEG of a gallery photo (sources under a --thumbnail-root only)",
             responses={200: {"content": {"image/jpeg": {}}}})
    def thumbnail(source: str = Query(...)):
        return Response(_thumbnail(source, roots), media_type="image/jpeg",
                        headers={"Cache-Control": "private, max-age=3600"})

    app.add_middleware(_BodyLimit, limit=MAX_MESSAGE_BYTES)
    return app


def _change(change) -> dict:
    return {"faces_changed": change.faces_changed, "index_version": change.index_version}


def _face_ids(values) -> list[int]:
    try:
        ids = [int(v) for v in values]
    except (TypeError, ValueError):
        raise InvalidRequest("face ids are decimal strings of unsigned 64-bit integers") from None
    if any(not 0 <= i < 2**64 for i in ids):
        raise InvalidRequest("a face id is in 0..2^64-1")
    return ids


def _thumbnail(source: str, roots) -> bytes:
    """A JPEG thumbnail of `source` when it is a photo file under one of `roots`; NotFound otherwise."""
    from PIL import Image

    from opqn_model.images import load_image

    if not roots:
        raise NotFound("thumbnails are off on this coordinator (start it with --thumbnail-root DIR)")
    path = pathlib.Path(os.path.realpath(source))
    if not any(path.is_relative_to(root) for root in roots) or not path.is_file():
        raise NotFound(f"no thumbnail for {source!r}: not a file under a thumbnail root")
    image = Image.fromarray(load_image(str(path)))
    image.thumbnail((THUMBNAIL_PX, THUMBNAIL_PX))
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=85)
    return out.getvalue()


class HttpServer:
    """The HTTP API served by uvicorn in a thread of the coordinator's process.

    Args:
        tls: query_node.security.ServerTls (its PEM files are written to a private temporary folder for uvicorn).
    """

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, tls=None):
        import socket
        import threading

        import uvicorn

        self.host = host
        self._sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self._sock.bind((host, port))
        except OSError as exc:
            from facepq_core.errors import ConfigError

            raise ConfigError(f"cannot listen for HTTP on {host}:{port}: {exc.strerror}") from None
        self.port = self._sock.getsockname()[1]
        kwargs = _tls_files(tls) if tls is not None else {}
        config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off", http=_NoDelayH11(),
                                **kwargs)
        self.server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self._sock]},
                                        name="facepq-http", daemon=True)

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self) -> "HttpServer":
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started and self._thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.02)
        return self

    def stop(self, grace: float = 2.0) -> None:
        self.server.should_exit = True
        self._thread.join(grace + 1)
        self._sock.close()


def _NoDelayH11():
    """uvicorn's h11 protocol with TCP_NODELAY on every connection. Without it the accepted sockets kept Nagle's
    algorithm: every request after the first on a keep-alive connection waited for the client's delayed ACK
    between the response's header and body writes, 44 ms per request here (0.8 ms with it)."""
    import socket

    from uvicorn.protocols.http.h11_impl import H11Protocol

    class NoDelayH11(H11Protocol):
        def connection_made(self, transport):
            sock = transport.get_extra_info("socket")
            if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            super().connection_made(transport)

    return NoDelayH11


def _tls_files(tls) -> dict:
    import ssl
    import tempfile

    folder = pathlib.Path(tempfile.mkdtemp(prefix="facepq-http-tls-"))
    os.chmod(folder, 0o700)
    (folder / "cert.pem").write_bytes(tls.cert)
    (folder / "key.pem").write_bytes(tls.key)
    out = {"ssl_certfile": str(folder / "cert.pem"), "ssl_keyfile": str(folder / "key.pem")}
    if tls.client_ca:
        (folder / "client-ca.pem").write_bytes(tls.client_ca)
        out.update(ssl_ca_certs=str(folder / "client-ca.pem"), ssl_cert_reqs=ssl.CERT_REQUIRED)
    return out
