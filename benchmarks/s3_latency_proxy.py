"""An HTTP proxy in front of a local S3 (moto) that adds a fixed latency to every request
and counts the requests by kind.

S3's first-byte latency is typically 10-50 ms, moto's on 127.0.0.1 well under 1 ms: a
client that makes its requests one after another pays nothing here and everything on
AWS.  Behind this proxy it pays what it would pay there, so the benchmarks measure the
request pattern, not the loopback.  The same counts are how the tests show that a run
made one GET per photo and no HEAD.

Clients point their endpoint at :attr:`LatencyProxy.endpoint` (boto3's
``AWS_ENDPOINT_URL``, S3A's ``fs.s3a.endpoint``); path-style addressing.  One thread
per client connection, HTTP/1.1 keep-alive, so a client with many connections has many
requests in flight, as it would against S3.

    python benchmarks/s3_latency_proxy.py --upstream http://127.0.0.1:5000 --latency-ms 20
"""

from __future__ import annotations

import argparse
import http.client
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Dict, Optional
from urllib.parse import parse_qs, urlsplit

__all__ = ["LatencyProxy", "request_kind"]

# Headers that describe one hop, not the message: never relayed.
_HOP = {
    "connection",
    "keep-alive",
    "proxy-connection",
    "transfer-encoding",
    "te",
    "trailer",
    "upgrade",
    "content-length",
}


def request_kind(method: str, target: str, headers) -> str:
    """The S3 operation class of a request: ``GET``, ``HEAD``, ``LIST``, ``PUT``, ``DELETE``,
    ``POST`` (multi-object delete, multipart), or ``SQS``/``OTHER`` for other services.

    A ``GET`` on a bucket (``/bucket`` or ``/bucket/`` with or without a query) or with
    ``list-type``/``delimiter``/``prefix`` in its query is a listing; a ``GET`` of a key
    is an object read.
    """
    if headers.get("X-Amz-Target", "").startswith("AmazonSQS") or "sqs" in headers.get(
        "Content-Type", ""
    ):
        return "SQS"
    parts = urlsplit(target)
    query = parse_qs(parts.query, keep_blank_values=True)
    path = parts.path.strip("/")
    if method == "GET":
        if {"location", "versioning", "notification", "policy"} & set(query):
            return "OTHER"  # bucket configuration, not a listing
        if "/" not in path or {"list-type", "delimiter", "prefix"} & set(query):
            return "LIST"
        return "GET"
    if method in ("HEAD", "PUT", "DELETE"):
        return method
    if method == "POST":
        return "SQS" if "Action" in query else "POST"
    return "OTHER"


class LatencyProxy:
    """A threaded proxy to ``upstream`` adding ``latency_ms`` before each request.

    Parameters
    ----------
    upstream : str
        ``http://host:port`` of the S3 server.
    latency_ms : float
        Added to every request before it is forwarded (the round trip S3 would cost).

    Attributes
    ----------
    counts : collections.Counter
        Requests by :func:`request_kind` since the start or the last :meth:`reset`.
    """

    def __init__(self, upstream: str, latency_ms: float = 0.0, port: int = 0) -> None:
        up = urlsplit(upstream)
        self.upstream = (up.hostname or "127.0.0.1", up.port or 80)
        self.latency = latency_ms / 1000.0
        self.counts: Counter = Counter()
        self.keys: Counter = Counter()  # (kind, path) of GET/HEAD: requests per object
        self.active = 0  # requests being served now
        self.max_active = 0  # the most served at once since the last reset
        self._lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive: one connection, many requests

            def log_message(self, *args) -> None:  # one line per request: far too many
                pass

            def _relay(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                kind = request_kind(self.command, self.path, self.headers)
                with proxy._lock:
                    proxy.counts[kind] += 1
                    if kind in ("GET", "HEAD"):
                        proxy.keys[(kind, urlsplit(self.path).path)] += 1
                    proxy.active += 1
                    proxy.max_active = max(proxy.max_active, proxy.active)
                conn = http.client.HTTPConnection(*proxy.upstream, timeout=120)
                try:
                    if proxy.latency:
                        time.sleep(proxy.latency)
                    headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP}
                    if body is not None:
                        headers["Content-Length"] = str(len(body))
                    conn.request(self.command, self.path, body=body, headers=headers)
                    resp = conn.getresponse()
                    data = resp.read()
                finally:
                    conn.close()
                    with proxy._lock:
                        proxy.active -= 1
                self.send_response_only(resp.status, resp.reason)
                for k, v in resp.getheaders():
                    if k.lower() not in _HOP:
                        self.send_header(k, v)
                if self.command == "HEAD":
                    # The object's length, as the server gave it (no body follows).
                    cl = resp.getheader("Content-Length")
                    if cl is not None:
                        self.send_header("Content-Length", cl)
                else:
                    self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD" and data:
                    self.wfile.write(data)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _relay

        self._server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self._server.daemon_threads = True
        self._thread: Optional[threading.Thread] = None

    @property
    def endpoint(self) -> str:
        """``http://127.0.0.1:PORT`` of the proxy."""
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def set_latency(self, latency_ms: float) -> None:
        """Change the added latency (applies to the next requests)."""
        self.latency = latency_ms / 1000.0

    def snapshot(self) -> Dict[str, int]:
        """The counts by kind so far."""
        with self._lock:
            return dict(self.counts)

    def per_object(self, kind: str) -> Counter:
        """How many ``kind`` (``GET`` or ``HEAD``) requests each object path received."""
        with self._lock:
            return Counter({p: n for (k, p), n in self.keys.items() if k == kind})

    def reset(self) -> Dict[str, int]:
        """Zero the counts; return them as they were."""
        with self._lock:
            out = dict(self.counts)
            self.counts.clear()
            self.keys.clear()
            self.max_active = self.active
            return out

    def start(self) -> LatencyProxy:
        """Serve in a daemon thread."""
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and close the socket."""
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> LatencyProxy:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--upstream", required=True, help="http://host:port of the S3 server")
    parser.add_argument("--latency-ms", type=float, default=20.0)
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    proxy = LatencyProxy(args.upstream, args.latency_ms, args.port).start()
    print(f"proxy {proxy.endpoint} -> {args.upstream} (+{args.latency_ms:g} ms)", flush=True)
    try:
        while True:
            time.sleep(10)
            print(proxy.snapshot(), flush=True)
    except KeyboardInterrupt:
        proxy.stop()


if __name__ == "__main__":
    main()
