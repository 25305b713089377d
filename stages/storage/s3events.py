"""S3 ``ObjectCreated`` notifications read from an SQS queue: new photos without a listing.

A bucket configured to notify a queue (``fruits-pipeline emr bucket notifications``)
sends one message per upload.  What this module knows about those messages:

* configuring a notification first sends an ``s3:TestEvent`` message, which names no
  object (:attr:`Message.test`: delete it, featurize nothing);
* keys arrive URL-encoded as in a form (``Apple+Braeburn/caf%C3%A9.jpg`` for
  ``Apple Braeburn/café.jpg``): :func:`urllib.parse.unquote_plus` gives the key back;
* a message may hold several records, and a queue subscribed through SNS wraps the
  S3 message in an SNS envelope (``"Type": "Notification"``);
* delivery is at least once, never guaranteed: a message can come twice, and an
  event can be lost.  A consumer deletes messages only after the features they led
  to are committed (a crash before that delivers them again), skips objects already
  in the features table, and runs a full ``featurize --incremental`` now and then to
  catch lost events.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from datetime import datetime
from typing import Iterable, List, Optional, Tuple
from urllib.parse import unquote_plus, urlsplit

from stages.storage.fetch import RequestCounter, StoreSettings

logger = logging.getLogger(__name__)

__all__ = ["EventQueue", "Message", "ObjectEvent", "parse_message"]

_MAX_MESSAGES = 10  # SQS's maximum per ReceiveMessage and per DeleteMessageBatch


@dataclass(frozen=True)
class ObjectEvent:
    """One created object.

    Attributes
    ----------
    bucket, key : str
        The key decoded (as stored, e.g. ``Test/Apple Braeburn/café.jpg``).
    size : int
    time_ms : int
        ``eventTime`` in milliseconds since the epoch.
    """

    bucket: str
    key: str
    size: int
    time_ms: int

    def uri(self, scheme: str = "s3") -> str:
        """``scheme://bucket/key``."""
        return f"{scheme}://{self.bucket}/{self.key}"


@dataclass
class Message:
    """A received message: its receipt (to delete it) and its object events.

    Attributes
    ----------
    receipt : str
    events : list of ObjectEvent
        ``ObjectCreated:*`` records only (removals and others are left out).
    test : bool
        An ``s3:TestEvent`` (or a message that is no S3 event at all): nothing to do.
    """

    receipt: str
    events: List[ObjectEvent] = field(default_factory=list)
    test: bool = False


def _time_ms(text: str) -> int:
    stamp = datetime.fromisoformat(text.replace("Z", "+00:00"))
    return int(stamp.timestamp() * 1000)


def parse_message(body: str) -> Tuple[List[ObjectEvent], bool]:
    """``(events, test)`` of one SQS message body (see the module docstring).

    A body that is not an S3 notification gives ``([], True)`` with a warning: it
    cannot lead to work, and keeping it would block nothing but the queue's count.
    """
    try:
        doc = json.loads(body)
        if isinstance(doc, dict) and doc.get("Type") == "Notification" and "Message" in doc:
            doc = json.loads(doc["Message"])  # an S3 event delivered through SNS
    except (TypeError, ValueError):
        logger.warning("queue: a message that is not JSON was ignored: %.80r", body)
        return [], True
    if not isinstance(doc, dict):
        return [], True
    if doc.get("Event") == "s3:TestEvent":
        return [], True
    records = doc.get("Records")
    if not isinstance(records, list):
        logger.warning("queue: a message that is no S3 event was ignored: %.80r", body)
        return [], True
    events = []
    for rec in records:
        if not str(rec.get("eventName", "")).startswith("ObjectCreated:"):
            continue
        s3 = rec.get("s3", {})
        obj = s3.get("object", {})
        events.append(
            ObjectEvent(
                bucket=s3.get("bucket", {}).get("name", ""),
                key=unquote_plus(obj.get("key", "")),
                size=int(obj.get("size", 0)),
                time_ms=_time_ms(rec.get("eventTime", "1970-01-01T00:00:00Z")),
            )
        )
    return events, False


def _region_of(url: str, default: str) -> str:
    """The region in an SQS queue URL (``https://sqs.eu-west-3.amazonaws.com/...``)."""
    host = urlsplit(url).hostname or ""
    parts = host.split(".")
    if host.endswith("amazonaws.com") and len(parts) >= 4 and parts[0] == "sqs":
        return parts[1]
    return default


class EventQueue:
    """An SQS queue of S3 notifications (receive, then delete after the commit).

    Parameters
    ----------
    url : str
        The queue URL.
    settings : StoreSettings
        Its keys (and, for a local emulator, its endpoint: moto serves SQS and S3 on
        one port); ``AWS_ENDPOINT_URL_SQS`` wins for the endpoint, as in boto3.
    visibility : int, optional
        Seconds a received message stays hidden from other readers (default: the
        queue's own ``VisibilityTimeout``, which ``bucket notifications`` sets).
    """

    def __init__(self, url: str, settings: StoreSettings, visibility: Optional[int] = None) -> None:
        import boto3

        self.url = url
        self.visibility = visibility
        self.counter = RequestCounter()
        endpoint = os.environ.get("AWS_ENDPOINT_URL_SQS") or settings.endpoint
        self.client = boto3.session.Session().client(
            "sqs",
            region_name=_region_of(url, settings.region),
            endpoint_url=None if "amazonaws.com" in url else endpoint,
            aws_access_key_id=settings.access_key,
            aws_secret_access_key=settings.secret_key,
            aws_session_token=settings.session_token,
        )
        self.client.meta.events.register("before-send.sqs", self.counter)

    def receive(self, wait_seconds: int = 0, max_messages: int = _MAX_MESSAGES) -> List[Message]:
        """Up to ``max_messages`` (at most 10) messages; waits up to ``wait_seconds``
        (long polling, at most 20) when the queue is empty."""
        args = {
            "QueueUrl": self.url,
            "MaxNumberOfMessages": max(1, min(_MAX_MESSAGES, max_messages)),
            "WaitTimeSeconds": max(0, min(20, int(wait_seconds))),
        }
        if self.visibility is not None:
            args["VisibilityTimeout"] = int(self.visibility)
        resp = self.client.receive_message(**args)
        out = []
        for m in resp.get("Messages", []):
            events, test = parse_message(m.get("Body", ""))
            out.append(Message(m["ReceiptHandle"], events, test))
        return out

    def receive_many(self, limit: int, wait_seconds: int = 0) -> List[Message]:
        """Messages until the queue is empty (a receive returns none) or ``limit`` object
        events are in hand; only the first receive waits."""
        out: List[Message] = []
        n_events = 0
        wait = wait_seconds
        while n_events < limit:
            got = self.receive(wait)
            if not got:
                break
            out += got
            n_events += sum(len(m.events) for m in got)
            wait = 0
        return out

    def delete(self, receipts: Iterable[str]) -> None:
        """Delete the messages of ``receipts`` (10 a request).

        Raises
        ------
        OSError
            SQS refused some (the message says which and why).
        """
        receipts = list(receipts)
        for i in range(0, len(receipts), _MAX_MESSAGES):
            chunk = receipts[i : i + _MAX_MESSAGES]
            resp = self.client.delete_message_batch(
                QueueUrl=self.url,
                Entries=[{"Id": str(j), "ReceiptHandle": r} for j, r in enumerate(chunk)],
            )
            failed = resp.get("Failed") or []
            if failed:
                first = failed[0]
                raise OSError(
                    f"SQS did not delete {len(failed)} message(s) from {self.url}: "
                    f"{first.get('Code')} {first.get('Message')}"
                )

    def approximate_count(self) -> Optional[int]:
        """Messages waiting (SQS's approximate count), or None if it cannot be read."""
        try:
            attrs = self.client.get_queue_attributes(
                QueueUrl=self.url, AttributeNames=["ApproximateNumberOfMessages"]
            )["Attributes"]
        except Exception:  # a count is a nicety: never fail a run on it
            return None
        return int(attrs.get("ApproximateNumberOfMessages", 0))
