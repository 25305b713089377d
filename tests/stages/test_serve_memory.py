"""``serve``'s memory under big uploads: the real server process, its peak RSS measured
(the kernel's high-water mark, reset before the uploads; psutil for the RSS)."""

from __future__ import annotations

import asyncio
import io
import os
import socket
import subprocess
import sys
import time

import httpx
import numpy as np
import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.slow

MiB = 2**20


def _gradient(w: int, h: int, channels: int) -> np.ndarray:
    arr = np.zeros((h, w, channels), np.uint8)
    arr[..., 0] = (np.arange(w) % 251)[None, :]
    arr[..., 1] = (np.arange(h) % 241)[:, None]
    arr[..., 2] = ((np.arange(w)[None, :] + np.arange(h)[:, None]) % 239).astype(np.uint8)
    if channels == 4:
        arr[..., 3] = 255
    return arr


def _encode(arr: np.ndarray, fmt: str) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, fmt, **({"quality": 70} if fmt == "JPEG" else {}))
    return buf.getvalue()


@pytest.fixture(scope="module")
def big_uploads():
    """A 8000 x 7999 RGBA PNG (the probe's), a 8000 x 7999 JPEG and a 4000 x 3999 RGBA PNG."""
    png = _encode(_gradient(8000, 7999, 4), "PNG")
    jpeg = _encode(_gradient(8000, 7999, 3), "JPEG")
    small_png = _encode(_gradient(4000, 3999, 4), "PNG")
    assert max(len(png), len(jpeg), len(small_png)) < 10 * MiB
    return {"png": png, "jpeg": jpeg, "small_png": small_png}


def _peak_rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


@pytest.fixture(scope="module")
def server_process(sample_left_out):
    """``fruits-pipeline serve`` as its own process, warmed up by one photo."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "stages.cli", "serve", str(sample_left_out[0])]
    proc = subprocess.Popen(cmd + ["--port", str(port)], env=env, stdout=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, "serve exited"
            assert time.monotonic() < deadline, "serve did not answer in 3 minutes"
            try:
                if httpx.get(f"{url}/healthz", trust_env=False).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        photo = sample_left_out[1][0][0].read_bytes()
        r = httpx.post(
            f"{url}/api/similar", files={"image": ("p.jpg", photo)}, timeout=60, trust_env=False
        )
        assert r.status_code == 200, r.text
        yield proc, url
    finally:
        proc.terminate()
        proc.wait(30)


def _at_once(url: str, uploads) -> list:
    async def run():
        async with httpx.AsyncClient(base_url=url, timeout=300, trust_env=False) as client:
            return await asyncio.gather(
                *(client.post("/api/similar", files={"image": ("p", data)}) for data in uploads)
            )

    return asyncio.run(run())


def test_four_big_uploads_at_once_stay_under_the_stated_bound(server_process, big_uploads):
    import psutil

    from stages.search.serve import decode_memory_bound

    proc, url = server_process
    server = psutil.Process(proc.pid)
    before = server.memory_info().rss
    with open(f"/proc/{proc.pid}/clear_refs", "w") as fh:
        fh.write("5")  # resets the high-water mark to the current RSS
    for kind in ("png", "jpeg", "small_png"):
        answers = _at_once(url, [big_uploads[kind]] * 4)
        status = {r.status_code for r in answers}
        if kind == "png":  # decoded whole, 64 MP of RGBA: over the budget, refused
            assert status == {413}, [r.text for r in answers]
            assert "8000x7999 pixels" in answers[0].json()["error"]
        else:  # a JPEG is decoded at reduced size; a 16 MP PNG fits
            assert status == {200}, [r.text for r in answers]
    growth = _peak_rss(proc.pid) - before
    bound = decode_memory_bound() + 8 * max(len(d) for d in big_uploads.values())
    assert growth <= bound, f"peak {growth / MiB:.0f} MiB over idle, bound {bound / MiB:.0f} MiB"
    # What the decodes took is given back, not held by the allocator.
    held = server.memory_info().rss - before
    assert held < 64 * MiB, f"{held / MiB:.0f} MiB still held after the uploads"
