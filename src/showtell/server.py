"""HTTP API and web page: ``create_app(model)`` -> a FastAPI app; ``serve(...)`` runs it with uvicorn.

Requests never run the model on the event loop: each uploaded image goes into a bounded queue, and
one worker thread takes whatever arrived within a short window (up to ``max_batch`` images; longer under load, see
``Batcher._window``) and captions it as one batch. A full queue answers 503, a request that waits too long 504, an
upload over the limit 413 (bytes, or pixels: see ``max_megapixels``), an empty one 400 and one that is not a
readable image 415, always as JSON ``{"error": "..."}``. Only uploaded bytes are read, never a path the client names.

One image never fails another: if captioning a batch raises, each of its images is captioned again alone, so
only the culprit gets an error (415 for an image problem, 500 otherwise). Each upload is decoded and preprocessed as
it is queued, in ``decode_threads`` threads (one per core, at most 8), while the model captions the batch before;
so ``max_megapixels`` times ``decode_threads`` bounds the memory that decoding takes, whatever the number of
requests, and a queued image holds only its model input. After each batch the freed heap is given back to the OS
(glibc keeps it otherwise).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import io
import logging
import os
import queue
import socket
import sys
import threading
import time
import warnings
from collections.abc import AsyncIterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from importlib.resources import files
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from PIL import Image
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from showtell.errors import ShowtellError
from showtell.loader import default_workers

STATIC_DIR = str(files("showtell") / "static")
MULTIPART_OVERHEAD = 64 * 1024  # room for multipart headers and boundaries around an image at the limit
log = logging.getLogger("uvicorn.error")  # where uvicorn itself reports; shown at its --log-level warning


def _libc_malloc_trim() -> Any:
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim  # glibc only: musl has no libc.so.6
    except (OSError, AttributeError):
        return None


_malloc_trim = _libc_malloc_trim()


@dataclass
class ServerOptions:
    max_upload_mb: float = 10.0   # largest image, in MiB
    max_megapixels: float = 40.0  # largest image, in million pixels: bounds the memory decoding takes
    max_files: int = 16           # most images in one POST /v1/captions
    max_batch: int = 16           # most images captioned together
    batch_window_ms: float = 10.0  # how long the worker waits for more requests to join a batch
    loaded_window: float = 0.25   # under load, up to this share of the last batch's time (see Batcher._window)
    queue_size: int = 64          # images waiting; more gives 503
    timeout_s: float = 60.0       # a request still waiting after this gives 504
    beam_size: int = 3
    max_length: int = 20
    tags: int = 5                 # most probable ImageNet classes given with each caption
    decode_threads: int | None = None  # uploads decoded at once (None: one per core, at most 8)

    @property
    def max_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)


class Busy(Exception):
    """The queue is full."""


@dataclass
class _Job:
    image: bytes
    future: Future  # the result
    loaded: Future  # the image decoded and preprocessed (BatchCaptioning.load), or the exception that raised


class Batcher:
    """A bounded queue of images and one thread that captions them in batches."""

    def __init__(self, captioner: Any, options: ServerOptions):
        self.captioner = captioner
        self.options = options
        self._queue: queue.Queue[_Job | None] = queue.Queue(maxsize=options.queue_size)
        self._thread = threading.Thread(target=self._run, name="showtell-batcher", daemon=True)
        self._decoders = ThreadPoolExecutor(options.decode_threads or default_workers(),
                                            thread_name_prefix="showtell-decode")

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        while self._thread.is_alive():
            try:
                self._queue.put(None, timeout=0.1)
                break
            except queue.Full:
                continue
        self._thread.join(timeout=self.options.timeout_s)
        self._decoders.shutdown(wait=False, cancel_futures=True)

    @property
    def depth(self) -> int:
        return self._queue.qsize()

    def submit(self, images: list[bytes]) -> list[Future]:
        """Queue images; all or none (raises Busy when they do not fit)."""
        futures: list[Future] = []
        for image in images:
            future: Future = Future()
            try:
                self._queue.put_nowait(_Job(image, future, self._decoders.submit(self._load, image)))
            except queue.Full:
                for f in futures:
                    f.cancel()
                raise Busy from None
            futures.append(future)
        return futures

    def _next_batch(self, window_s: float) -> tuple[list[_Job], bool]:
        first = self._queue.get()
        if first is None:
            return [], True
        batch, deadline = [first], time.monotonic() + window_s
        while len(batch) < self.options.max_batch:
            try:
                job = self._queue.get(timeout=max(deadline - time.monotonic(), 0))
            except queue.Empty:
                break
            if job is None:
                return batch, True
            batch.append(job)
        return batch, False

    def _run(self) -> None:
        stop, window_s = False, self.options.batch_window_ms / 1000
        while not stop:
            batch, stop = self._next_batch(window_s)
            for job in batch:
                if not job.future.set_running_or_notify_cancel():  # timed out while it waited
                    job.loaded.cancel()
            batch = [job for job in batch if not job.future.cancelled()]
            if not batch:
                continue
            started = time.monotonic()
            self._caption(batch, [job.loaded.result() for job in batch])
            window_s = self._window(len(batch), time.monotonic() - started)
            if _malloc_trim is not None and self._queue.empty():
                _malloc_trim(0)  # decoding big images left hundreds of MB of freed heap that glibc would keep

    def _window(self, size: int, seconds: float) -> float:
        """How long the next batch waits for more images. Under load (the batch was full, or images queued while it
        was captioned) up to ``loaded_window`` of that batch's time: clients that wait for their answer before
        sending again come back just after their batch, and with the short window they found the other clients'
        images already taken, so the clients stayed split in two part batches for good (16 clients: 8 and 8, or 14
        and 2; now 16: 1.12x the photos/s on a CPU, benchmarks/server_batching.py).
        Otherwise ``batch_window_ms``, so that a lone request is not held."""
        base = self.options.batch_window_ms / 1000
        loaded = size >= self.options.max_batch or not self._queue.empty()
        return max(base, self.options.loaded_window * seconds) if loaded else base

    def _load(self, image: bytes) -> Any:
        try:
            return self.captioner.load(image)
        except Exception as e:  # a bug in decoding: this image's error, not the server's end
            return e

    def _caption(self, batch: list[_Job], loaded: list[Any]) -> None:
        """Caption a batch; if that raises, each image again alone, so only the one at fault gets the error."""
        try:
            for x in loaded:
                if isinstance(x, Exception):
                    raise x
            results = self.captioner.caption_loaded([job.image for job in batch], loaded,
                                                    beam_size=self.options.beam_size,
                                                    max_length=self.options.max_length,
                                                    num_return=self.options.beam_size, tags=self.options.tags)
        except Exception as e:  # a file the decoder chokes on, a bug, out of memory: keep serving
            if len(batch) > 1:
                for job, x in zip(batch, loaded):
                    self._caption([job], [x])
                return
            if not isinstance(e, ShowtellError):
                log.error("captioning an image failed: %s: %s", _kind(e), e)
            batch[0].future.set_exception(e)
            return
        for job, result in zip(batch, results):
            job.future.set_result(result)


class _BodyLimit:
    """Refuse request bodies over a size limit with 413, before or while they are read."""

    def __init__(self, app: ASGIApp, limit_for: Any, message_for: Any = None):
        self.app = app
        self.limit_for = limit_for
        self.message_for = message_for  # the limit as the user set it (limit_for adds room for multipart framing)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limit_for(scope["path"])
        too_large = self.message_for(scope["path"]) if self.message_for else _too_large(limit)
        headers = dict(scope["headers"])
        length = headers.get(b"content-length", b"")
        if length.isdigit() and int(length) > limit:
            await _error(413, too_large)(scope, receive, send)
            return
        seen = 0

        async def limited_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise HTTPException(413, too_large)
            return message

        await self.app(scope, limited_receive, send)


def _too_large(limit: int) -> str:
    return f"upload too large (limit {limit / 1024 / 1024:.3g} MiB)"


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def _pixel_error(data: bytes, megapixels: float) -> str | None:
    """Why an image has too many pixels, from its header (nothing decoded); None when it has not, or when Pillow
    cannot read the header (the captioner then says what is wrong)."""
    try:
        with warnings.catch_warnings():  # racing images.py's own is harmless: what reaches it is under our limit
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # over our limit anyway
            with Image.open(io.BytesIO(data)) as img:
                width, height = img.size
    except Image.DecompressionBombError as e:  # over Pillow's own limit, which is over ours
        return f"image too large ({e})"
    except Exception:
        return None
    if width * height <= megapixels * 1e6:
        return None
    return f"image too large ({width * height / 1e6:.3g} megapixels; limit {megapixels:g})"


def _kind(e: BaseException) -> str:
    """An exception's type as a reader knows it: ValueError, struct.error."""
    return f"{type(e).__module__}.{type(e).__qualname__}".removeprefix("builtins.")


def _image_error(name: str, message: str) -> str:
    """The captioner names byte inputs '<N bytes>'; name the uploaded file instead."""
    if message.startswith("<") and ": " in message:
        message = message.split(": ", 1)[1]
    return f"{name}: {message}"


def _result_json(result: Any, captioner: Any, started: float) -> dict[str, Any]:
    return {"caption": result.caption, "score": round(float(result.score), 4),
            "alternatives": [{"caption": c, "score": round(float(s), 4)} for c, s in result.alternatives],
            "tags": [], **result.extras(),  # tags (label, p) always, a list; confidence, tags_note when set
            **_attention_json(result, captioner),
            "model": captioner.name, "elapsed_ms": round((time.perf_counter() - started) * 1000, 1)}


def _attention_json(result: Any, captioner: Any) -> dict[str, Any]:
    """An attention decoder's maps: each word of the caption and its [grid][grid] map (summing to 1), over the
    square the encoder saw (``crop_pct`` of the photo's shorter side, centred)."""
    if not getattr(result, "attention", None):
        return {}
    return {"attention": {"crop_pct": captioner.preprocess.crop_pct, "words": [w for w, _ in result.attention],
                          "maps": [grid.round(4).tolist() for _, grid in result.attention]}}


_UPLOAD_DOC = {"requestBody": {"required": True, "content": {
    "multipart/form-data": {"schema": {"type": "object", "properties": {
        "file": {"type": "string", "format": "binary"}}, "required": ["file"]}},
    "image/*": {"schema": {"type": "string", "format": "binary"}},
    "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}}}
_ERRORS = {code: {"description": text, "content": {"application/json": {"example": {"error": "..."}}}}
           for code, text in [(400, "empty upload or malformed request"),
                              (413, "upload over --max-upload-mb, or an image over max_megapixels"),
                              (415, "not a readable image"), (503, "queue full, retry shortly"),
                              (504, "captioning took too long")]}
_UPLOADS_DOC = {"requestBody": {"required": True, "content": {
    "multipart/form-data": {"schema": {"type": "object", "properties": {
        "files": {"type": "array", "items": {"type": "string", "format": "binary"}}}, "required": ["files"]}}}}}


def create_app(model: Any = None, max_upload_mb: float = 10.0, **options: Any) -> FastAPI:
    """The app for a checkpoint path or model name (loaded once at start-up), or a loaded Captioner.

    ``options`` are :class:`ServerOptions` fields (max_batch, batch_window_ms, queue_size, timeout_s, ...).
    """
    opts = ServerOptions(max_upload_mb=max_upload_mb, **options)
    state: dict[str, Any] = {}

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        captioner = model
        if captioner is None or isinstance(captioner, (str, os.PathLike)):
            from showtell.captioner import load

            captioner = await asyncio.to_thread(load, model)
        state["captioner"] = captioner
        state["batcher"] = batcher = Batcher(captioner, opts)
        batcher.start()
        try:
            yield
        finally:
            await asyncio.to_thread(batcher.stop)

    app = FastAPI(title="showtell", summary="Show-and-Tell image captioning", lifespan=lifespan,
                  docs_url=None, redoc_url=None)
    app.add_middleware(_BodyLimit, limit_for=lambda path: (
        (opts.max_bytes + MULTIPART_OVERHEAD) * (opts.max_files if path == "/v1/captions" else 1)),
        message_for=lambda path: (f"request too large (limit {opts.max_files} files of {opts.max_upload_mb:g} MiB)"
                                  if path == "/v1/captions" else _too_large(opts.max_bytes)))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _error(exc.status_code, str(exc.detail), getattr(exc, "headers", None))

    @app.exception_handler(ClientDisconnect)
    async def client_gone(request: Request, exc: ClientDisconnect) -> JSONResponse:
        client = request.client.host if request.client else "a client"
        log.warning("%s disconnected before its upload to %s was read", client, request.url.path)
        return _error(400, "client disconnected")  # nobody is there to read it

    @app.exception_handler(Exception)
    async def server_error(request: Request, exc: Exception) -> JSONResponse:  # a bug: uvicorn logs its traceback
        return _error(500, f"internal error ({_kind(exc)})")

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _error(422, "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()))

    async def read_uploads(request: Request, fields: tuple[str, ...], raw_ok: bool) -> list[tuple[str, bytes]]:
        ctype = request.headers.get("content-type", "")
        if ctype.startswith("multipart/form-data"):
            form = await request.form(max_files=opts.max_files, max_fields=opts.max_files)
            uploads = []
            try:
                for key in fields:
                    for value in form.getlist(key):
                        if not isinstance(value, UploadFile):
                            raise HTTPException(400, f"form field '{key}' must be a file upload")
                        uploads.append((os.path.basename(value.filename or "upload"), await value.read()))
            finally:
                await form.close()
            if not uploads:
                raise HTTPException(400, f"no image: send the photo as multipart field '{fields[0]}'")
            return uploads
        if not raw_ok:
            raise HTTPException(400, f"send the photos as multipart/form-data field '{fields[0]}'")
        return [("upload", await request.body())]

    async def caption_all(uploads: list[tuple[str, bytes]]) -> list[Any]:
        """A result or a (status, message) per upload; 503/504 for the whole request."""
        out: list[Any] = [None] * len(uploads)
        todo = []
        for i, (name, data) in enumerate(uploads):
            if not data:
                out[i] = (400, f"{name}: empty upload, not an image")
            elif len(data) > opts.max_bytes:
                out[i] = (413, f"{name}: {_too_large(opts.max_bytes)}")
            elif too_big := _pixel_error(data, opts.max_megapixels):
                out[i] = (413, f"{name}: {too_big}")
            else:
                todo.append(i)
        if not todo:
            return out
        try:
            futures = state["batcher"].submit([uploads[i][1] for i in todo])
        except Busy:
            raise HTTPException(503, "server busy: too many images waiting, try again shortly",
                                headers={"Retry-After": "1"}) from None
        try:
            results = await asyncio.wait_for(asyncio.gather(*map(asyncio.wrap_future, futures), return_exceptions=True),
                                             opts.timeout_s)
        except asyncio.TimeoutError:
            raise HTTPException(504, f"captioning took longer than {opts.timeout_s:g} s") from None
        for i, result in zip(todo, results):
            name = uploads[i][0]
            if isinstance(result, ShowtellError):
                out[i] = (415, _image_error(name, str(result)))
            elif isinstance(result, Exception):
                out[i] = (500, f"{name}: internal error while captioning this image ({_kind(result)})")
            else:
                out[i] = (415, _image_error(name, result.error)) if result.error else result
        return out

    @app.post("/v1/caption", openapi_extra=_UPLOAD_DOC, responses=_ERRORS, summary="Caption one photo")
    async def caption_one(request: Request) -> JSONResponse:
        """Multipart field `file`, or the image bytes as the request body."""
        started = time.perf_counter()
        uploads = await read_uploads(request, ("file",), raw_ok=True)
        if len(uploads) > 1:
            raise HTTPException(400, "one photo per request here; use /v1/captions for several")
        (result,) = await caption_all(uploads)
        if isinstance(result, tuple):
            return _error(*result)
        return JSONResponse(_result_json(result, state["captioner"], started))

    @app.post("/v1/captions", openapi_extra=_UPLOADS_DOC, responses=_ERRORS, summary="Caption several photos")
    async def caption_many(request: Request) -> JSONResponse:
        """Multipart field `files`, repeated. One entry per file, in order: a caption or an error."""
        started = time.perf_counter()
        uploads = await read_uploads(request, ("files", "file"), raw_ok=False)
        results = await caption_all(uploads)
        out = []
        for (name, _), result in zip(uploads, results):
            if isinstance(result, tuple):
                out.append({"file": name, "error": result[1], "status": result[0]})
            else:
                out.append({"file": name, **_result_json(result, state["captioner"], started)})
        return JSONResponse(out)

    @app.get("/v1/model", summary="The loaded model")
    async def model_info() -> dict[str, Any]:
        captioner = state["captioner"]
        meta = captioner.meta
        return {"name": captioner.name, "encoder": captioner.checkpoint.encoder, "vocab_size": len(captioner.vocab),
                "metrics": meta.get("metrics"), "training": meta.get("training"), "beam_size": opts.beam_size,
                "max_upload_mb": opts.max_upload_mb, "max_megapixels": opts.max_megapixels}

    @app.get("/healthz", summary="Liveness")
    async def healthz() -> dict[str, Any]:
        return {"status": "ok", "model": state["captioner"].name, "queue": state["batcher"].depth}

    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(os.path.join(STATIC_DIR, "index.html"))

    @app.get("/docs", include_in_schema=False)
    async def docs() -> FileResponse:
        return FileResponse(os.path.join(STATIC_DIR, "docs.html"))

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    return app


def bind(host: str, port: int) -> socket.socket:
    """A socket bound to host:port (port 0: any free one), or a ShowtellError saying why not."""
    where = f"{host}:{port}"
    if not 0 <= port <= 65535:
        raise ShowtellError(f"cannot serve on {where}: port must be 0-65535")
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: restart without waiting
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        why = "the port is in use (stop the other server or choose another --port)" if e.errno == errno.EADDRINUSE \
            else e.strerror or str(e)
        raise ShowtellError(f"cannot serve on {where}: {why}") from None
    return sock


def serve(model: Any = None, host: str = "127.0.0.1", port: int = 8000, max_upload_mb: float = 10.0,
          max_megapixels: float = ServerOptions.max_megapixels, device: str = "auto",
          precision: str | None = None) -> None:
    """Bind the port, load the model (on ``device``), then serve the API and page until interrupted.

    uvicorn gets the bound socket, so a port in use or out of range fails before anything is loaded or announced."""
    import uvicorn

    from showtell.captioner import load

    sock = bind(host, port)
    with sock:
        named = model is None or isinstance(model, (str, os.PathLike))
        captioner = load(model, device=device, precision=precision) if named else model
        app = create_app(captioner, max_upload_mb=max_upload_mb, max_megapixels=max_megapixels)
        url_host = f"[{host}]" if ":" in host else host
        print(f"showtell: serving model '{captioner.name}' on http://{url_host}:{sock.getsockname()[1]}/ "
              "(API docs at /docs)", file=sys.stderr, flush=True)
        uvicorn.Server(uvicorn.Config(app, log_level="warning")).run(sockets=[sock])
