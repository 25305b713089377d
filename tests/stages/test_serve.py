"""``serve``: the JSON API, bad uploads, 200 concurrent requests, and the page in
headless Chromium (driven over the DevTools protocol)."""

from __future__ import annotations

import asyncio
import json
import socket
import time
import urllib.request
from pathlib import Path

import httpx
import pytest

from tests.chromium import Chromium, needs_chromium
from tests.conftest import SAMPLE, serving
from tests.stages.test_search import _ids, bad_inputs

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(sample_engine):
    """The app on a free localhost port, in this process (the model is already built)."""
    from stages.search.serve import create_app

    with serving(create_app(engine=sample_engine)) as (host, port):
        yield f"http://{host}:{port}"


def _post(url, payload: bytes, name: str = "photo.jpg", **kw):
    return httpx.post(
        f"{url}/api/similar", files={"image": (name, payload)}, timeout=60, trust_env=False, **kw
    )


def test_healthz(server, sample_engine):
    r = httpx.get(f"{server}/healthz", trust_env=False)
    assert r.status_code == 200
    assert r.json() == {"status": "ok", "model": sample_engine.model_info}
    assert r.json()["model"]["rows"] == 90


def test_api_answers_the_similar_object(server, sample_engine, sample_left_out):
    photo, label = sample_left_out[1][2]
    r = _post(server, photo.read_bytes(), data={"top": "4"})
    assert r.status_code == 200, r.text
    answer = r.json()
    expected = sample_engine.similar_bytes(photo.read_bytes(), 4)
    assert answer["vote"] == expected["vote"] and answer["vote"]["label"] == label
    assert answer["label"] == label and answer["photos"] == 9 and answer["close_match"]
    assert answer["open_set"]["score"] <= answer["open_set"]["threshold"]
    rule = answer["model"]["open_set"]
    assert rule["calibrated"] and 0 <= rule["unknown_rejected"] <= 1 and rule["auroc"] > 0.5
    assert [m["path"] for m in answer["matches"]] == [m["path"] for m in expected["matches"]]
    for got, want in zip(answer["matches"], expected["matches"]):
        assert got["distance"] == pytest.approx(want["distance"], rel=1e-4)
        assert got["thumbnail"] == want["thumbnail"]
    assert answer["model"] == expected["model"]
    assert r.headers["x-content-type-options"] == "nosniff"


@pytest.mark.parametrize(("name", "data", "status", "match"), bad_inputs(), ids=_ids(bad_inputs()))
def test_bad_uploads_are_one_4xx_and_the_server_keeps_serving(server, name, data, status, match):
    r = _post(server, data)
    assert r.status_code == status, r.text
    assert list(r.json()) == ["error"] and match in r.json()["error"]
    assert _post(server, (SAMPLE / "Kiwi" / "4_100.jpg").read_bytes()).status_code == 200


@pytest.mark.parametrize(
    ("kwargs", "status", "match"),
    [
        ({"content": b"raw bytes", "headers": {"content-type": "image/jpeg"}}, 415, "multipart"),
        ({"files": {"photo": ("a.jpg", b"x")}}, 400, "field named 'image'"),
        ({"data": {"image": "not a file"}, "files": {"x": ("a", b"b")}}, 400, "'image'"),
        ({"files": {"image": ("a.jpg", b"x")}, "data": {"top": "0"}}, 400, "between 1 and 50"),
        ({"files": {"image": ("a.jpg", b"x")}, "data": {"top": "ten"}}, 400, "not an integer"),
        ({"files": {"image": ("../../etc/passwd", b"root:x:0:0")}}, 415, "not an image"),
        (
            {"content": b"--x\r\n", "headers": {"content-type": "multipart/form-data"}},
            400,
            "bad multipart upload: Missing boundary",
        ),
    ],
)
def test_bad_requests(server, kwargs, status, match):
    r = httpx.post(f"{server}/api/similar", timeout=30, trust_env=False, **kwargs)
    assert r.status_code == status, r.text
    assert match in r.json()["error"]


def test_a_large_photo_is_answered(server):
    import io

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    Image.fromarray((rng.random((1200, 1600, 3)) * 255).astype(np.uint8)).save(buf, "PNG")
    assert 4 * 2**20 < len(buf.getvalue()) < 10 * 2**20  # parsed in memory, not spooled
    r = _post(server, buf.getvalue(), name="big.png")
    assert r.status_code == 200, r.text
    assert r.json()["close_match"] is False and r.json()["label"] is None  # noise


def test_no_route_reads_a_file(server):
    for path in ("/../../etc/passwd", "/static/similar.html", "/stages/serve.py", "/docs"):
        r = httpx.get(server + path, trust_env=False)
        assert r.status_code == 404, path


def test_200_concurrent_requests(server, sample_left_out):
    left = sample_left_out[1]
    bad = bad_inputs()
    jobs = [("good",) + left[i % len(left)] for i in range(160)]
    jobs += [("bad",) + bad[i % len(bad)][1:] for i in range(40)]

    async def one(client, job):
        if job[0] == "good":
            r = await client.post("/api/similar", files={"image": ("p.jpg", job[1].read_bytes())})
            return r.status_code, r.json().get("vote", {}).get("label"), job[2]
        r = await client.post("/api/similar", files={"image": ("p.jpg", job[1])})
        return r.status_code, r.json().get("error"), job[2]

    async def run_all():
        limits = httpx.Limits(max_connections=200)
        async with httpx.AsyncClient(
            base_url=server, limits=limits, timeout=120, trust_env=False
        ) as client:
            return await asyncio.wait_for(
                asyncio.gather(*(one(client, j) for j in jobs)), timeout=240
            )

    results = asyncio.run(run_all())
    good = [(s, lab, want) for (s, lab, want), j in zip(results, jobs) if j[0] == "good"]
    assert all(s == 200 for s, _, _ in good), {s for s, _, _ in good}
    assert sum(lab == want for _, lab, want in good) >= 0.9 * len(good)
    bad_got = [(s, want) for (s, _, want), j in zip(results, jobs) if j[0] == "bad"]
    assert all(s == want for s, want in bad_got), bad_got
    assert httpx.get(f"{server}/healthz", trust_env=False).status_code == 200


# ---------------------------------------------------------------------------- browser


class DevTools:
    """A headless Chromium and one page, driven over the DevTools protocol."""

    def __init__(self) -> None:
        import websocket

        self.chromium = Chromium(
            ["--remote-debugging-port=0", "--remote-allow-origins=*", "about:blank"]
        )
        self.proc = self.chromium.proc
        active = self.chromium.profile / "DevToolsActivePort"
        deadline = time.monotonic() + 60
        while not (active.exists() and active.read_text().strip()):
            assert self.proc.poll() is None, "chromium exited"
            assert time.monotonic() < deadline, "chromium did not open its DevTools port"
            time.sleep(0.1)
        port = int(active.read_text().split()[0])
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        pages = []
        while not pages:  # the port opens before the first tab exists
            assert time.monotonic() < deadline, "chromium opened no page"
            with opener.open(f"http://127.0.0.1:{port}/json/list", timeout=30) as resp:
                pages = [t for t in json.load(resp) if t["type"] == "page"]
            time.sleep(0.1)
        self.ws = websocket.create_connection(pages[0]["webSocketDebuggerUrl"], timeout=60)
        self._id = 0

    def call(self, method: str, **params):
        self._id += 1
        self.ws.send(json.dumps({"id": self._id, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv())
            if msg.get("id") == self._id:
                assert "error" not in msg, msg
                return msg["result"]

    def evaluate(self, expression: str):
        out = self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        return out["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 60):
        deadline = time.monotonic() + timeout
        while True:
            value = self.evaluate(expression)
            if value:
                return value
            assert time.monotonic() < deadline, f"timed out waiting for {expression}"
            time.sleep(0.1)

    def upload(self, selector: str, path: Path) -> None:
        root = self.call("DOM.getDocument")["root"]["nodeId"]
        node = self.call("DOM.querySelector", nodeId=root, selector=selector)["nodeId"]
        self.call("DOM.setFileInputFiles", files=[str(path)], nodeId=node)

    def close(self) -> None:
        self.ws.close()
        self.chromium.close()


STATE = """JSON.stringify({
  vote: document.getElementById("vote").textContent,
  label: document.getElementById("vote").dataset.label || "",
  rule: document.getElementById("rule").textContent,
  nomatch: document.querySelectorAll("#grid figure.nomatch").length,
  error: document.getElementById("error").textContent,
  imgs: Array.from(document.querySelectorAll("#grid img")).map(
    (im) => ({complete: im.complete, width: im.naturalWidth, alt: im.alt}))
})"""


@needs_chromium
def test_page_in_chromium(server, sample_left_out, tmp_path):
    photo, label = sample_left_out[1][5]
    browser = DevTools()
    try:
        browser.call("Page.enable")
        browser.call("Page.navigate", url=server + "/")
        browser.wait_for("document.readyState === 'complete' && !!document.getElementById('photo')")
        assert browser.evaluate("document.getElementById('photo').accept") == "image/*"
        browser.upload("#photo", photo)
        loaded = (
            "(() => { const s = JSON.parse(" + STATE + "); return s.imgs.length > 0 && "
            "s.imgs.every((i) => i.complete) ? JSON.stringify(s) : ''; })()"
        )
        state = json.loads(browser.wait_for(loaded))
        assert len(state["imgs"]) == 10
        assert all(i["width"] > 0 for i in state["imgs"]), state["imgs"]
        assert state["label"] == label and state["vote"].startswith(f"{label} — ")
        assert "the collection holds 9 photos of it" in state["vote"]
        assert "Measured on this collection" in state["rule"], state["rule"]
        assert state["error"] == ""
        shot = browser.call("Page.captureScreenshot", format="png")["data"]
        assert len(shot) > 1000

        # Noise: no label, a plain sentence, the nearest photos all marked "not a match".
        import numpy as np
        from PIL import Image

        noise = tmp_path / "noise.png"
        rng = np.random.default_rng(0)
        Image.fromarray((rng.random((160, 200, 3)) * 255).astype(np.uint8)).save(noise)
        browser.upload("#photo", noise)
        none = loaded.replace("s.imgs.length > 0", "s.vote.startsWith('This fruit')")
        state = json.loads(browser.wait_for(none))
        assert state["label"] == "" and state["nomatch"] == len(state["imgs"]) == 10
        assert state["vote"].startswith("This fruit does not look like any in the collection")

        text = tmp_path / "notes.txt"
        text.write_text("not a photo\n" * 20)
        browser.upload("#photo", text)
        error = browser.wait_for("document.getElementById('error').textContent")
        assert "not an image" in error
        assert browser.evaluate("document.querySelectorAll('#grid img').length") == 0
    finally:
        browser.close()


def test_serve_on_a_busy_port_is_one_line(sample_left_out, capsys):
    from stages.cli import main

    busy = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    busy.bind(("127.0.0.1", 0))
    busy.listen(1)
    try:
        port = busy.getsockname()[1]
        assert main(["serve", str(sample_left_out[0]), "--port", str(port)]) == 2
    finally:
        busy.close()
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"cannot listen on 127.0.0.1:{port}" in err[0]
