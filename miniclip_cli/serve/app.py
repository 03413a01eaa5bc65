"""`miniclip serve`: one page (static/index.html, static/app.js) over a small JSON API, on Starlette.

    GET  /                        the page
    GET  /api/health              {"model", "backend", "backend_label", "image_size", "photos", "photo_count"}
    POST /api/classify            multipart: `image` (one file), `captions` (repeated) -> what `classify --json` prints
    GET  /api/search?q=TEXT&top=N what `search --json` prints for that caption
    POST /api/search              multipart: `image`, `top` -> the same, with the image as the query
    GET  /photos/PATH[?thumb=1]   a photo of the index (or a small JPEG of it), and nothing else

Every refusal is a 4xx with {"error": "..."}. Inference runs on `workers` threads; at most `max_waiting`
more requests wait and the next ones get 503, so a burst cannot grow memory without bound.
No torch is imported here: with an ONNX encoder the server runs on the PyTorch-free install.
"""

from __future__ import annotations

import contextlib
import io
import ipaddress
import math
import re
import threading
import time
from collections import OrderedDict
from pathlib import Path

import anyio
from starlette.applications import Starlette
from starlette.datastructures import Headers, MutableHeaders
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Route

from ..cli.common import _json_ready as json_ready
from ..data.pixels import load_rgb, normalise, resize_centre_crop
from ..errors import CheckpointError, ConfigError, DataError, MiniclipError
from ..runtime import ONNX_DIR, Encoder, is_export, normalise_rows, open_encoder

STATIC = Path(__file__).parent / "static"
MIN_CAPTIONS, MAX_CAPTIONS = 2, 8  # the page offers two to eight boxes
MAX_TEXT = 1000  # characters in a caption or a query, as `classify` allows; the tokenizer keeps far fewer tokens
MAX_TOP = 100
FORM_SLACK = 64 * 1024  # captions and multipart headers, on top of the image's size limit
THUMB_PX, THUMB_CACHE = 320, 256  # 256 thumbnails of ~20 kB: the cache stays near 5 MB
# Caption sets whose features are kept: the page sends the same captions with each new image. Kept per set, as
# `classify` encodes them (int8 activations are quantised per batch, so one caption alone could differ slightly).
TEXT_CACHE = 256
BACKEND_LABELS = {"torch": "PyTorch", "onnx": "ONNX int8", "onnx-fp32": "ONNX fp32"}
LOOPBACK_NAMES = {"localhost", "127.0.0.1", "::1"}
SECURITY_HEADERS = {
    # app.js is a file, not inline, so no inline script runs even if some text were ever taken for HTML.
    "content-security-policy": "default-src 'self'; img-src 'self' blob: data:; style-src 'self' 'unsafe-inline'; "
                               "script-src 'self'; connect-src 'self'; frame-ancestors 'none'",
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
}


def is_loopback(host: str) -> bool:
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class Gate:
    """At most `max_pending` requests in flight (the next get 503), and `workers` threads of inference."""

    def __init__(self, workers: int, max_pending: int):
        self.limiter = anyio.CapacityLimiter(workers)
        self.pending, self.max_pending = 0, max_pending

    @contextlib.asynccontextmanager
    async def slot(self):
        # One event loop thread updates the count, so no lock is needed.
        if self.pending >= self.max_pending:
            raise HTTPException(503, f"busy: {self.pending} requests in progress; try again in a moment",
                                headers={"Retry-After": "1"})
        self.pending += 1
        try:
            yield
        finally:
            self.pending -= 1

    async def run(self, function, *args):
        return await anyio.to_thread.run_sync(function, *args, limiter=self.limiter)


class Guard:
    """ASGI wrapper: security headers on every response and, when serving on loopback, only Host names of
    this machine, so that a web page cannot reach the server under a name of its own (DNS rebinding)."""

    def __init__(self, app, allowed_hosts: set[str] | None):
        self.app, self.allowed_hosts = app, allowed_hosts

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if self.allowed_hosts is not None:
            host = Headers(scope=scope).get("host", "")
            name = host[1:].split("]")[0] if host.startswith("[") else host.rsplit(":", 1)[0]
            if name not in self.allowed_hosts:
                response = JSONResponse({"error": f"Host {host!r} is not this server's; open http://127.0.0.1"}, 400)
                return await response(scope, receive, send)

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for key, value in SECURITY_HEADERS.items():
                    headers.setdefault(key, value)
            await send(message)

        await self.app(scope, receive, send_with_headers)


class Service:
    """The model, the optional photo index, and the request handlers over them."""

    def __init__(self, encoder: Encoder, model_name: str, backend: str, index=None, max_upload_mb: float = 20,
                 workers: int = 2, max_waiting: int = 16):
        if max_upload_mb <= 0:
            raise ConfigError(f"--max-upload-mb {max_upload_mb}: give a size above 0")
        if workers < 1:
            raise ConfigError(f"--workers {workers}: give 1 or more")
        self.encoder, self.model_name, self.backend, self.index = encoder, model_name, backend, index
        self.max_upload_mb, self.max_upload = max_upload_mb, int(max_upload_mb * 2 ** 20)
        self.gate = Gate(workers, workers + max_waiting)
        self.thumb_limiter = anyio.CapacityLimiter(workers)  # thumbnails wait their turn, never a 503
        self.thumbs: OrderedDict[str, bytes] = OrderedDict()
        self.texts: OrderedDict[tuple, object] = OrderedDict()  # caption set -> c d features
        self.texts_lock = threading.Lock()  # read and written from the inference threads
        self.photo_root = index.root.resolve() if index is not None else None
        self.photo_paths = set(index.paths) if index is not None else set()
        self.page = (STATIC / "index.html").read_bytes()
        self.script = (STATIC / "app.js").read_bytes()

    # --- the page -------------------------------------------------------------------------------------------
    async def home(self, request: Request) -> Response:
        return Response(self.page, media_type="text/html; charset=utf-8")

    async def app_js(self, request: Request) -> Response:
        return Response(self.script, media_type="text/javascript; charset=utf-8")

    async def health(self, request: Request) -> Response:
        return JSONResponse({"model": self.model_name, "backend": self.backend,
                             "backend_label": BACKEND_LABELS.get(self.backend, self.backend),
                             "image_size": self.encoder.image_size,
                             "photos": str(self.photo_root) if self.photo_root else None,
                             "photo_count": len(self.photo_paths)})

    # --- classify -------------------------------------------------------------------------------------------
    async def classify(self, request: Request) -> Response:
        async with self.gate.slot():
            form = await self.read_form(request)
            captions = check_captions(form.getlist("captions"))
            name, data = await self.upload(form)
            start = time.perf_counter()
            probabilities = await self.gate.run(self.caption_probabilities, data, name, captions)
        scores = [{"caption": c, "probability": p} for c, p in zip(captions, probabilities)]
        # Rounded as `classify --json` prints it, so that both give the same numbers.
        return JSONResponse(json_ready({"image": name, "scores": scores}, ""), headers=timing(start))

    def caption_probabilities(self, data: bytes, name: str, captions: list[str]) -> list[float]:
        pixels = self.pixels(data, name)
        probabilities = self.encoder.pixel_probabilities(pixels, captions, self.text_features(captions))
        if not all(math.isfinite(p) for p in probabilities):
            raise CheckpointError(f"{self.model_name}: the model gave non-finite probabilities for {name}; its "
                                  "weights are damaged: check the run with `miniclip eval`")
        return probabilities

    def text_features(self, captions: list[str]):
        key = tuple(captions)
        with self.texts_lock:
            if key in self.texts:
                self.texts.move_to_end(key)
                return self.texts[key]
        features = self.encoder.encode_texts(captions)
        with self.texts_lock:
            self.texts[key] = features
            while len(self.texts) > TEXT_CACHE:
                self.texts.popitem(last=False)
        return features

    def pixels(self, data: bytes, name: str):
        """1 3 s s float32, as `eval_pixels` makes from a file: the same decoder (with its pixel limit) and crop."""
        try:
            image = load_rgb(io.BytesIO(data), name=name)
        except DataError as problem:
            # PIL names an in-memory file by its repr; name the upload instead.
            message = re.sub(r"<_io\.BytesIO object at 0x[0-9a-fA-F]+>", repr(name), str(problem))
            raise HTTPException(415, message) from None
        encoder = self.encoder
        return normalise(resize_centre_crop(image, encoder.image_size), encoder.mean, encoder.std)[None]

    # --- search ---------------------------------------------------------------------------------------------
    async def search_text(self, request: Request) -> Response:
        index = self.need_index()
        query = request.query_params.get("q", "").strip()
        if not query:
            raise HTTPException(400, "give a caption to search for: /api/search?q=a+dog+on+the+beach")
        if len(query) > MAX_TEXT:
            raise HTTPException(400, f"the query has {len(query)} characters; give at most {MAX_TEXT}")
        top = parse_top(request.query_params.get("top", "10"))
        from ..index import query_vector

        async with self.gate.slot():
            start = time.perf_counter()
            hits = await self.gate.run(lambda: self.hits(index, query_vector(self.encoder, [query]), top))
        return JSONResponse(hits, headers=timing(start))

    async def search_image(self, request: Request) -> Response:
        index = self.need_index()
        async with self.gate.slot():
            form = await self.read_form(request)
            top = parse_top(str(form.get("top", "10")))
            name, data = await self.upload(form)
            start = time.perf_counter()
            # One image query: its unit feature is the direction, as `query_vector` gives for one image.
            hits = await self.gate.run(
                lambda: self.hits(index, normalise_rows(self.encoder.encode_pixels(self.pixels(data, name)))[0], top))
        return JSONResponse(hits, headers=timing(start))

    def hits(self, index, direction, top: int) -> list[dict]:
        from ..index import search

        hits = search(index, None, None, top=top, direction=direction)
        return [{"path": str(h.path), "score": round(h.score, 4), "rank": h.rank} for h in hits]

    def need_index(self):
        if self.index is None:
            raise HTTPException(404, "no photo folder is being served; start the server with --photos FOLDER")
        return self.index

    # --- photos ---------------------------------------------------------------------------------------------
    async def photo(self, request: Request) -> Response:
        path = self.photo_path(request)
        if request.query_params.get("thumb") not in (None, "0"):
            return Response(await self.thumbnail(path), media_type="image/jpeg",
                            headers={"cache-control": "private, max-age=3600"})
        return FileResponse(path)

    def photo_path(self, request: Request) -> Path:
        """The file of the index that the URL names, or a 404: no '..', absolute path, encoded slash or
        backslash, nothing the index does not list, nothing that resolves (a symlink) outside the folder."""
        missing = HTTPException(404, "no such photo in the index")
        if self.index is None:
            raise missing
        raw = request.scope.get("raw_path", b"").lower()
        rel = request.path_params["path"]
        if b"%2f" in raw or b"%5c" in raw or "\\" in rel or rel.startswith("/") or "\0" in rel:
            raise missing
        if any(part in ("", ".", "..") for part in rel.split("/")) or rel not in self.photo_paths:
            raise missing
        path = (self.photo_root / rel).resolve()
        if not path.is_relative_to(self.photo_root) or not path.is_file():
            raise missing
        return path

    async def thumbnail(self, path: Path) -> bytes:
        key = str(path)
        if key in self.thumbs:
            self.thumbs.move_to_end(key)
            return self.thumbs[key]

        def make() -> bytes:
            try:
                image = load_rgb(path)
            except DataError as problem:
                raise HTTPException(415, str(problem)) from None
            image.thumbnail((THUMB_PX, THUMB_PX))
            buffer = io.BytesIO()
            image.save(buffer, "JPEG", quality=82)
            return buffer.getvalue()

        data = await anyio.to_thread.run_sync(make, limiter=self.thumb_limiter)
        self.thumbs[key] = data
        while len(self.thumbs) > THUMB_CACHE:
            self.thumbs.popitem(last=False)
        return data

    # --- uploads --------------------------------------------------------------------------------------------
    async def read_form(self, request: Request):
        """The multipart form, refused with 413 as soon as the body passes the size limit."""
        limit = self.max_upload + FORM_SLACK
        too_big = HTTPException(413, f"the upload is over {self.max_upload_mb:g} MB; send a smaller image "
                                     "(or start the server with a larger --max-upload-mb)")
        try:
            declared = int(request.headers.get("content-length", "0"))
        except ValueError:
            raise HTTPException(400, "the Content-Length header is not a number") from None
        if declared > limit:
            raise too_big
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise too_big
        if not request.headers.get("content-type", "").startswith("multipart/form-data"):
            raise HTTPException(415, "send a multipart form (an `image` file field and `captions` text fields), "
                                     "e.g. curl -F image=@photo.jpg -F captions='a dog' -F captions='a cat'")
        replay = {"type": "http.request", "body": bytes(body), "more_body": False}
        del body

        async def receive():
            return replay

        return await Request(request.scope, receive).form(max_files=1, max_fields=64)

    async def upload(self, form) -> tuple[str, bytes]:
        upload = form.get("image")
        if upload is None or isinstance(upload, str):
            raise HTTPException(400, "no image: send it as the file field `image`, e.g. curl -F image=@photo.jpg")
        data = await upload.read()
        await upload.close()
        name = Path(upload.filename or "upload").name[:200] or "upload"
        if not data:
            raise HTTPException(400, f"{name}: the file is empty")
        if len(data) > self.max_upload:
            raise HTTPException(413, f"{name}: over {self.max_upload_mb:g} MB; send a smaller image")
        return name, data


def check_captions(captions: list) -> list[str]:
    """As `classify` takes them (stripped, empty ones dropped), two to eight, each at most MAX_TEXT long."""
    captions = [c.strip() for c in captions if isinstance(c, str) and c.strip()]
    if len(captions) < MIN_CAPTIONS:
        raise HTTPException(400, "give at least two captions to choose between (repeat the field `captions`)")
    if len(captions) > MAX_CAPTIONS:
        raise HTTPException(400, f"{len(captions)} captions; give at most {MAX_CAPTIONS}")
    for caption in captions:
        if len(caption) > MAX_TEXT:
            raise HTTPException(400, f"a caption has {len(caption)} characters; give at most {MAX_TEXT}")
    return captions


def parse_top(text: str) -> int:
    try:
        top = int(text)
    except ValueError:
        raise HTTPException(400, f"top={text[:20]!r}: give a whole number from 1 to {MAX_TOP}") from None
    if not 1 <= top <= MAX_TOP:
        raise HTTPException(400, f"top={top}: give a whole number from 1 to {MAX_TOP}")
    return top


def timing(start: float) -> dict:
    return {"server-timing": f"model;dur={1000 * (time.perf_counter() - start):.1f}"}


STATUS = ((DataError, 400), (ConfigError, 400), (CheckpointError, 500))


async def http_error(request: Request, exc: HTTPException) -> Response:
    return JSONResponse({"error": exc.detail}, exc.status_code, headers=exc.headers)


async def miniclip_error(request: Request, exc: MiniclipError) -> Response:
    status = next((code for kind, code in STATUS if isinstance(exc, kind)), 400)
    return JSONResponse({"error": str(exc)}, status)


async def internal_error(request: Request, exc: Exception) -> Response:
    return JSONResponse({"error": f"internal error ({type(exc).__name__}); run with --debug and report it"}, 500)


def create_app(encoder: Encoder, model_name: str, backend: str, index=None, max_upload_mb: float = 20,
               workers: int = 2, max_waiting: int = 16, allowed_hosts: set[str] | None = None):
    """The ASGI app over an encoder and an optional loaded index (miniclip_cli.index.load_index).

    allowed_hosts: the Host names to answer (None: any); `build_app` gives the loopback names when the server
    listens on loopback."""
    service = Service(encoder, model_name, backend, index, max_upload_mb, workers, max_waiting)
    routes = [
        Route("/", service.home),
        Route("/app.js", service.app_js),
        Route("/api/health", service.health),
        Route("/api/classify", service.classify, methods=["POST"]),
        Route("/api/search", service.search_text, methods=["GET"]),
        Route("/api/search", service.search_image, methods=["POST"]),
        Route("/photos/{path:path}", service.photo),
    ]
    handlers = {HTTPException: http_error, MiniclipError: miniclip_error, Exception: internal_error}
    app = Starlette(routes=routes, exception_handlers=handlers)
    app.state.service = service
    return Guard(app, allowed_hosts)


def build_app(run: str | Path, backend: str = "auto", photos: str | Path | None = None, which: str = "best",
              device: str = "auto", host: str = "127.0.0.1", **options):
    """Open the run's model (and the index of `photos`, built by `miniclip index` with this run) and make the app."""
    run = Path(run).expanduser()
    if not run.is_dir():
        raise CheckpointError(f"{run}: no such run folder; give one written by `miniclip train`")
    if backend == "auto":  # as open_encoder decides, so that the index check knows which model this is
        backend = "onnx" if is_export(run) else "torch"
    index = None
    if photos is not None:
        from ..index import find_index, load, load_index, search

        encoder = load(run, backend, device)
        index = load_index(find_index(photos, run))
        search(index, encoder, "a photo", top=1)  # refuses a model other than the index's, naming the fix
    else:
        encoder = open_encoder(run, backend, which, device)
    allowed = (LOOPBACK_NAMES | {host}) if is_loopback(host) else None
    folder = run.resolve()
    name = folder.parent.name if is_export(folder) and folder.name == ONNX_DIR else folder.name
    return create_app(encoder, name, backend, index, allowed_hosts=allowed, **options)
