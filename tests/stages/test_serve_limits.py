"""``serve`` under hostile clients: slow bodies never hold the model or the decoders, and a
body that is too slow is refused with 408."""

from __future__ import annotations

import socket
import threading
import time

import httpx
import pytest

from stages.search.upload import BadImage
from tests.conftest import SAMPLE, serving

pytestmark = pytest.mark.slow

SLOW_CLIENTS = 20  # more than the 16 requests the app once read and answered at once


@pytest.fixture(scope="module")
def server(sample_engine):
    from stages.search.serve import create_app

    with serving(create_app(engine=sample_engine)) as addr:
        yield addr


def _slow_client(addr, length: int = 100_000) -> socket.socket:
    """A connection that sent the headers of a multipart upload and no body yet."""
    s = socket.create_connection(addr, timeout=30)
    s.sendall(
        (
            "POST /api/similar HTTP/1.1\r\nHost: x\r\n"
            "Content-Type: multipart/form-data; boundary=b\r\n"
            f"Content-Length: {length}\r\n\r\n--b\r\n"
        ).encode()
    )
    return s


def _post(addr, payload: bytes, timeout: float):
    return httpx.post(
        f"http://{addr[0]}:{addr[1]}/api/similar",
        files={"image": ("p.jpg", payload)},
        timeout=timeout,
        trust_env=False,
    )


def test_slow_clients_do_not_hold_the_app(server):
    """20 clients trickling one byte a second; a good upload is still answered at once
    (the client's 10 s timeout is ten times what it takes here: before, it waited for them)."""
    slow = [_slow_client(server) for _ in range(SLOW_CLIENTS)]
    stop = threading.Event()

    def trickle() -> None:
        while not stop.wait(1.0):
            for s in slow:
                try:
                    s.sendall(b"x")
                except OSError:
                    pass

    thread = threading.Thread(target=trickle, daemon=True)
    thread.start()
    try:
        time.sleep(1.5)  # every slow client is inside the app
        photo = (SAMPLE / "Kiwi" / "4_100.jpg").read_bytes()
        for _ in range(3):
            r = _post(server, photo, timeout=10)
            assert r.status_code == 200, r.text
            assert r.json()["vote"]["label"] == "Kiwi"
    finally:
        stop.set()
        thread.join(10)
        for s in slow:
            s.close()


def test_a_body_too_slow_or_stalled_is_a_408(sample_engine):
    from stages.search.serve import create_app

    # The trickle (a byte every 0.5 s) is 4x inside the idle limit: a late wake-up of this
    # thread must not look like a stall.
    app = create_app(engine=sample_engine, body_seconds=4.0, idle_seconds=2.0)
    with serving(app) as addr:
        stalled = _slow_client(addr)  # sends nothing more: the idle limit
        trickling = _slow_client(addr)  # a byte every 0.5 s: the body limit
        for _ in range(20):
            time.sleep(0.5)
            try:
                trickling.sendall(b"x")
            except OSError:
                break
        for s, why in ((stalled, "no byte for 2 s"), (trickling, "within 4 s")):
            answer = s.recv(65536).decode()
            assert answer.startswith("HTTP/1.1 408 "), answer
            assert why in answer, answer
            s.close()
        photo = (SAMPLE / "Kiwi" / "4_100.jpg").read_bytes()
        assert _post(addr, photo, timeout=30).status_code == 200


class _LateStream:
    """A request whose only chunk is handed over just after the body's deadline."""

    headers = {"content-type": "multipart/form-data; boundary=b"}

    def __init__(self, late_by: float) -> None:
        self.late_by = late_by

    async def stream(self):
        # Blocking on purpose: the chunk is ready when the event loop next looks, after the
        # deadline, as when a loaded machine runs the loop late.
        time.sleep(self.late_by)
        yield b"--b\r\n"


def test_a_chunk_that_arrives_at_the_deadline_is_a_408_not_a_busy_server():
    """The race behind a 503 seen in CI: the last byte of a trickling client came in as its
    3 s ran out, and the budget's wait was given no time at all, although it had room."""
    import asyncio

    from stages.search.serve import MAX_BODIES_BYTES, _ByteBudget, _read_body, _TooSlow

    budget = _ByteBudget(MAX_BODIES_BYTES)
    held = [0]
    with pytest.raises(_TooSlow, match="did not arrive within 0.2 s") as caught:
        asyncio.run(_read_body(_LateStream(0.3), budget, held, 0.2, 5.0))
    assert caught.value.status == 408
    assert held == [0] and budget.used == 0


class _OneChunk(_LateStream):
    def __init__(self) -> None:
        super().__init__(0.0)


def test_a_body_with_no_room_in_time_is_a_busy_server():
    """When other bodies hold the whole budget until this one's time is up: 503, and the
    budget is as it was."""
    import asyncio

    from stages.search.serve import _ByteBudget, _read_body

    budget = _ByteBudget(100)
    budget.used = 100  # the other requests' bytes
    held = [0]
    with pytest.raises(BadImage, match="busy") as caught:
        asyncio.run(_read_body(_OneChunk(), budget, held, 2.0, 5.0))
    assert caught.value.status == 503
    assert held == [0] and budget.used == 100
