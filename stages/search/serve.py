"""``fruits-pipeline serve RESULTS``: the similarity app (FastAPI + uvicorn).

Routes: ``GET /`` (the page), ``POST /api/similar`` (multipart, the photo in the field
``image``, optional ``top``) and ``GET /healthz``.  No route reads a file named by a
request: the page is read once at start-up, thumbnails come from the index by row id.

Load is bounded: at most :data:`MAX_IN_FLIGHT` requests are read and answered at once
(the others wait on their socket), at most two images are decoded at once, and one
thread runs the model on whatever photos are waiting, as one batch.
"""

from __future__ import annotations

import asyncio
import queue
import socket
import threading
from concurrent.futures import Future
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Callable, List, Optional, Tuple

import numpy as np
from fastapi import Request
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser

from stages.base.errors import UsageError
from stages.search.query import MAX_UPLOAD_BYTES, TOP_MAX, BadImage, QueryEngine, SearchIndex

__all__ = ["create_app", "serve", "Batcher"]

PAGE = Path(__file__).parents[1] / "static" / "similar.html"
MAX_IN_FLIGHT = 16
MAX_DECODING = 2
MAX_BATCH = 16
# The multipart framing around a 10 MB photo; the photo itself is checked on its own.
MAX_BODY = MAX_UPLOAD_BYTES + 64 * 1024
MAX_DRAIN = 64 * 1024 * 1024
HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}
PAGE_CSP = (
    "default-src 'none'; img-src 'self' data: blob:; style-src 'unsafe-inline'; "
    "script-src 'unsafe-inline'; connect-src 'self'; form-action 'self'"
)


class _InMemoryParser(MultiPartParser):
    # Starlette spools a file part over 1 MB to a temporary file; the body is already in
    # memory and bounded, so the part stays there too: no request touches the disk.
    spool_max_size = MAX_BODY + 1


class Batcher:
    """One thread running ``fn`` on a batch of whatever items are waiting.

    Parameters
    ----------
    fn : callable
        ``fn(stacked items) -> array`` with one output row per item.
    max_batch : int
    """

    def __init__(self, fn: Callable[[np.ndarray], np.ndarray], max_batch: int = MAX_BATCH):
        self._fn = fn
        self._max = max_batch
        self._q: queue.Queue[Optional[Tuple[np.ndarray, Future]]] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="fruits-embed", daemon=True)
        self._thread.start()

    def submit(self, item: np.ndarray) -> Future:
        """Queue one item; the future gets its output row."""
        fut: Future = Future()
        self._q.put((item, fut))
        return fut

    def close(self) -> None:
        """Stop the thread after the queued items."""
        self._q.put(None)
        self._thread.join(timeout=30)

    def _run(self) -> None:
        while True:
            first = self._q.get()
            if first is None:
                return
            batch: List[Tuple[np.ndarray, Future]] = [first]
            stop = False
            while len(batch) < self._max:
                try:
                    nxt = self._q.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    stop = True
                    break
                batch.append(nxt)
            try:
                out = self._fn(np.stack([item for item, _ in batch]))
            except Exception as exc:  # the model failed: every waiting request learns it
                for _, fut in batch:
                    fut.set_exception(exc)
            else:
                for row, (_, fut) in zip(out, batch):
                    fut.set_result(row)
            if stop:
                return


def _error(status: int, message: str):
    from fastapi.responses import JSONResponse

    return JSONResponse({"error": message}, status_code=status, headers=HEADERS)


async def _read_body(request) -> bytes:
    length = request.headers.get("content-length")
    if length is not None:
        try:
            declared = int(length)
        except ValueError:
            raise BadImage("bad Content-Length header", 400) from None
        if declared > MAX_BODY:
            if declared <= MAX_DRAIN:
                # Read and drop it: a client still sending would miss the answer.
                async for _ in request.stream():
                    pass
            raise BadImage(f"the upload is {declared} bytes, over the limit of 10 MB", 413)
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY:
            raise BadImage("the upload is over the limit of 10 MB", 413)
    return bytes(body)


async def _parse_form(request, body: bytes) -> Tuple[bytes, int]:
    ctype = request.headers.get("content-type", "")
    if not ctype.startswith("multipart/form-data"):
        raise BadImage("send the photo as multipart/form-data in a field named 'image'", 415)

    async def stream():
        yield body

    parser = _InMemoryParser(
        request.headers, stream(), max_files=1, max_fields=4, max_part_size=64 * 1024
    )
    try:
        form = await parser.parse()
    except MultiPartException as exc:
        raise BadImage(f"bad multipart upload: {exc.message}", 400) from None
    except (KeyError, ValueError):  # a Content-Type Starlette cannot split
        raise BadImage("bad multipart upload: malformed Content-Type", 400) from None
    try:
        image = form.get("image")
        if not isinstance(image, UploadFile):
            raise BadImage("no photo: send it in a multipart file field named 'image'", 400)
        data = await image.read()
        top_text = form.get("top", request.query_params.get("top", "10"))
        try:
            top = int(str(top_text))
        except ValueError:
            raise BadImage(f"top={top_text!r} is not an integer", 400) from None
        if not 1 <= top <= TOP_MAX:
            raise BadImage(f"top={top} must be between 1 and {TOP_MAX}", 400)
        return data, top
    finally:
        await form.close()


def create_app(results: Optional[str] = None, engine: Optional[QueryEngine] = None):
    """The FastAPI app over a local RESULTS folder (or an already loaded engine)."""
    from fastapi import FastAPI
    from fastapi.responses import HTMLResponse, JSONResponse
    from starlette.concurrency import run_in_threadpool

    if engine is None:
        if results is None:
            raise ValueError("give results or engine")
        engine = QueryEngine(results)
    page = PAGE.read_text(encoding="utf-8")
    state: dict = {}

    @asynccontextmanager
    async def lifespan(app):
        state["batcher"] = Batcher(engine.embed)
        state["slots"] = asyncio.Semaphore(MAX_IN_FLIGHT)
        state["decoding"] = asyncio.Semaphore(MAX_DECODING)
        try:
            yield
        finally:
            state["batcher"].close()

    app = FastAPI(
        title="fruits-pipeline similar",
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
        lifespan=lifespan,
    )

    @app.get("/", response_class=HTMLResponse)
    async def index() -> Any:
        return HTMLResponse(page, headers={**HEADERS, "Content-Security-Policy": PAGE_CSP})

    @app.get("/healthz")
    async def healthz() -> Any:
        return JSONResponse({"status": "ok", "model": engine.model_info}, headers=HEADERS)

    @app.post("/api/similar")
    async def similar(request: Request) -> Any:
        async with state["slots"]:
            try:
                body = await _read_body(request)
                data, top = await _parse_form(request, body)
                del body
                async with state["decoding"]:
                    image = await run_in_threadpool(engine.decode, data)
                del data
                point = await asyncio.wrap_future(state["batcher"].submit(image))
                answer = await run_in_threadpool(engine.answer, point, top)
            except BadImage as exc:
                return _error(exc.status, str(exc))
        return JSONResponse(answer, headers=HEADERS)

    return app


def serve(results: str, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Load the index and the model, then serve until interrupted.

    Raises
    ------
    UsageError
        No index, or the address cannot be bound (before the model is loaded).
    """
    import uvicorn

    SearchIndex(results)  # a missing index fails in a second, not after the model build
    try:
        info = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(info[0], socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(info[4])
    except OSError as exc:
        raise UsageError(
            f"cannot listen on {host}:{port}: {exc.strerror or exc}; pass another --host/--port"
        ) from None
    try:
        app = create_app(results)
        config = uvicorn.Config(app, log_level="warning", server_header=False)
        print(f"serving {results} on http://{host}:{sock.getsockname()[1]}/", flush=True)
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        sock.close()
