"""``fruits-pipeline serve RESULTS``: the similarity app (FastAPI + uvicorn).

Routes: ``GET /`` (the page), ``POST /api/similar`` (multipart, the photo in the field
``image``, optional ``top``) and ``GET /healthz``.  No route reads a file named by a
request: the page is read once at start-up, thumbnails come from the index by row id.

Load is bounded, and a slow client holds nothing that another request needs: a body must
arrive within :data:`BODY_SECONDS`, with no gap over :data:`IDLE_SECONDS` (else 408); the
bodies held at once are at most :data:`MAX_BODIES_BYTES` (a body waits for room, it is not
refused); only a body that is in takes one of :data:`MAX_DECODING` decode slots, and one
thread runs the model on whatever photos are waiting, as one batch.
"""

from __future__ import annotations

import asyncio
import ctypes
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
from stages.search.query import TOP_MAX, QueryEngine, SearchIndex
from stages.search.upload import DECODE_BYTES, MAX_UPLOAD_BYTES, BadImage

__all__ = ["create_app", "serve", "Batcher", "decode_memory_bound"]

PAGE = Path(__file__).parents[1] / "static" / "similar.html"
MAX_DECODING = 2
MAX_BATCH = 16
# The multipart framing around a 10 MB photo; the photo itself is checked on its own.
MAX_BODY = MAX_UPLOAD_BYTES + 64 * 1024
MAX_DRAIN = 64 * 1024 * 1024
# Bytes of request bodies held at once (16 full uploads).  A body is counted as it arrives,
# so a slow client holds only what it sent, and a fast one waits for room.
MAX_BODIES_BYTES = 16 * MAX_BODY
# A 10 MB photo over a 2 Mbit/s uplink takes 42 s; a slower body ties a connection up for
# nothing.  A pause longer than IDLE_SECONDS is a client gone (or a slowloris).
BODY_SECONDS = 60.0
IDLE_SECONDS = 10.0
HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}
PAGE_CSP = (
    "default-src 'none'; img-src 'self' data: blob:; style-src 'unsafe-inline'; "
    "script-src 'unsafe-inline'; connect-src 'self'; form-action 'self'"
)


def decode_memory_bound() -> int:
    """Bytes the uploads can add to the idle server at most: the bodies held, one parsed
    copy, and :data:`MAX_DECODING` decodes of at most ``DECODE_BYTES`` each (README)."""
    return MAX_BODIES_BYTES + MAX_BODY + MAX_DECODING * DECODE_BYTES


def _give_big_buffers_back() -> None:
    """Have glibc map every allocation over 1 MiB on its own, so a decode's buffers go
    back to the system when freed.  By default glibc raises that threshold after the
    first big free and keeps later ones in its per-thread arenas: 728 MiB stayed held
    after four big uploads.  (No-op without glibc.)"""
    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 20)  # -3: M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


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


def _error(status: int, message: str, close: bool = False):
    from fastapi.responses import JSONResponse

    headers = {**HEADERS, "Connection": "close"} if close else HEADERS
    return JSONResponse({"error": message}, status_code=status, headers=headers)


class _ByteBudget:
    """Bytes of bodies held at once; :meth:`take` waits for room (event-loop only)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self._freed = asyncio.Condition()

    def try_take(self, n: int) -> bool:
        """Take ``n`` bytes if there is room now, without waiting (and without yielding)."""
        if self.used == 0 or self.used + n <= self.limit:
            self.used += n
            return True
        return False

    async def take(self, n: int) -> None:
        async with self._freed:
            # One body alone may always proceed: the limit is at least one MAX_BODY.
            await self._freed.wait_for(lambda: self.used == 0 or self.used + n <= self.limit)
            self.used += n

    async def give(self, n: int) -> None:
        async with self._freed:
            self.used -= n
            self._freed.notify_all()


class _TooSlow(BadImage):
    def __init__(self, message: str) -> None:
        super().__init__(message, 408)


async def _next_chunk(chunks, deadline: float, idle: float, body_seconds: float) -> bytes:
    loop = asyncio.get_running_loop()
    left = deadline - loop.time()
    try:
        return await asyncio.wait_for(chunks.__anext__(), timeout=max(0.0, min(idle, left)))
    except asyncio.TimeoutError:
        if loop.time() >= deadline:
            raise _TooSlow(f"the upload did not arrive within {body_seconds:g} s") from None
        raise _TooSlow(f"the upload stalled: no byte for {idle:g} s") from None


async def _read_body(
    request, budget: _ByteBudget, held: List[int], body_seconds: float, idle_seconds: float
) -> bytes:
    """The body, read within the time limits, its bytes counted in ``budget`` as they come
    (``held[0]``: how many this request holds, given back by the caller)."""
    length = request.headers.get("content-length")
    if length is not None:
        try:
            declared = int(length)
        except ValueError:
            raise BadImage("bad Content-Length header", 400) from None
        if declared > MAX_BODY:
            if declared <= MAX_DRAIN:
                # Read and drop it (a client still sending would miss the answer), in time.
                drain_until = asyncio.get_running_loop().time() + body_seconds
                chunks = request.stream().__aiter__()
                try:
                    while True:
                        await _next_chunk(chunks, drain_until, idle_seconds, body_seconds)
                except (StopAsyncIteration, _TooSlow):
                    pass
            raise BadImage(f"the upload is {declared} bytes, over the limit of 10 MB", 413)
    body = bytearray()
    deadline = asyncio.get_running_loop().time() + body_seconds
    chunks = request.stream().__aiter__()
    while True:
        try:
            chunk = await _next_chunk(chunks, deadline, idle_seconds, body_seconds)
        except StopAsyncIteration:
            return bytes(body)
        if len(body) + len(chunk) > MAX_BODY:
            raise BadImage("the upload is over the limit of 10 MB", 413)
        left = deadline - asyncio.get_running_loop().time()
        if left <= 0:
            # The chunk came in as the time ran out: the client was late, the server was not
            # busy (a wait_for with no time left would time out even with room to spare).
            raise _TooSlow(f"the upload did not arrive within {body_seconds:g} s")
        if not budget.try_take(len(chunk)):
            try:
                await asyncio.wait_for(budget.take(len(chunk)), timeout=left)
            except asyncio.TimeoutError:
                raise BadImage(
                    "the server is busy: send the photo again in a moment", 503
                ) from None
        held[0] += len(chunk)
        body += chunk


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


def create_app(
    results: Optional[str] = None,
    engine: Optional[QueryEngine] = None,
    body_seconds: float = BODY_SECONDS,
    idle_seconds: float = IDLE_SECONDS,
):
    """The FastAPI app over a local RESULTS folder (or an already loaded engine).

    ``body_seconds``/``idle_seconds``: the time a request body may take, and the longest
    pause in it, before the request is answered 408.
    """
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
        state["bodies"] = _ByteBudget(MAX_BODIES_BYTES)
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
        held = [0]  # body bytes counted in the budget, until the photo is decoded
        try:
            body = await _read_body(request, state["bodies"], held, body_seconds, idle_seconds)
            data, top = await _parse_form(request, body)
            del body
            async with state["decoding"]:  # taken only once the whole body is in
                image = await run_in_threadpool(engine.decode, data)
            del data
            await state["bodies"].give(held[0])
            held[0] = 0
            point = await asyncio.wrap_future(state["batcher"].submit(image))
            answer = await run_in_threadpool(engine.answer, point, top)
        except _TooSlow as exc:
            # The rest of the body may never come: answer and close the connection.
            return _error(exc.status, str(exc), close=True)
        except BadImage as exc:
            return _error(exc.status, str(exc))
        finally:
            if held[0]:
                await state["bodies"].give(held[0])
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
    _give_big_buffers_back()
    try:
        app = create_app(results)
        config = uvicorn.Config(app, log_level="warning", server_header=False)
        print(f"serving {results} on http://{host}:{sock.getsockname()[1]}/", flush=True)
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        sock.close()
