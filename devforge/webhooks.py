"""Webhooks as Gitea 1.26 sends them: which hook gets which event, the bytes, the signatures,
every header of CONTRACT.md §1, and delivery at most once with a 5 s timeout and no retry."""

from __future__ import annotations

import hashlib
import hmac
import json
import queue
import threading
import uuid
from typing import Any, Literal
from urllib.parse import urlencode

import httpx

from .records import Delivery, HookRec

DELIVER_TIMEOUT = 5.0

# Which hook subscriptions include which fine event type (routers/api/v1/utils/hook.go).
SUBSCRIPTIONS: dict[str, set[str]] = {
    "issues": {"issues", "issues_only"},
    "issue_assign": {"issues", "issue_assign"},
    "issue_label": {"issues", "issue_label"},
    "issue_comment": {"issues", "issue_comment"},
    "pull_request": {"pull_request", "pull_request_only"},
    "pull_request_comment": {"pull_request", "pull_request_comment"},
    "pull_request_sync": {"pull_request", "pull_request_sync"},
    "pull_request_review_approved": {"pull_request", "pull_request_review"},
    "pull_request_review_rejected": {"pull_request", "pull_request_review"},
    "pull_request_review_comment": {"pull_request", "pull_request_review"},
    # CI events are their own subscriptions: no group includes them.
    "status": {"status"},
    "workflow_run": {"workflow_run"},
    "workflow_job": {"workflow_job"},
}
# X-Gitea-Event (coarse) for each X-Gitea-Event-Type (fine). Note the review trap.
COARSE_EVENT = {
    "issues": "issues",
    "issue_assign": "issues",
    "issue_label": "issues",
    "issue_comment": "issue_comment",
    "pull_request": "pull_request",
    "pull_request_comment": "issue_comment",
    "pull_request_sync": "pull_request",
    "pull_request_review_approved": "pull_request_approved",
    "pull_request_review_rejected": "pull_request_rejected",
    "pull_request_review_comment": "pull_request_comment",
    "status": "status",
    "workflow_run": "workflow_run",
    "workflow_job": "workflow_job",
}
# Which header families a forge sends. A strict Forgejo sends only its own (and GitHub's
# look-alikes), so a receiver still leaning on Gitea's or Gogs' names is caught.
Flavor = Literal["gitea", "forgejo"]
FLAVORS: tuple[Flavor, ...] = ("gitea", "forgejo")


def go_json(payload: Any) -> bytes:
    """Bytes as Go's json.MarshalIndent(p, "", "  ") writes them (escapes <, >, &)."""
    text = json.dumps(payload, indent=2, ensure_ascii=False)
    text = text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
    return text.encode()


def sign(secret: str, body: bytes) -> str:
    return hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def subscribed(hook: HookRec, event_type: str) -> bool:
    return bool(SUBSCRIPTIONS.get(event_type, {event_type}) & hook.events)


def delivery_for(hook: HookRec, event_type: str, payload: dict[str, Any], flavor: Flavor = "gitea") -> Delivery:
    """The request Gitea (or Forgejo) would send ``hook`` for ``payload``: body, signatures, headers."""
    body = go_json(payload)
    signature = sign(hook.secret, body) if hook.secret else ""
    delivery_id = str(uuid.uuid4())
    coarse = COARSE_EVENT.get(event_type, event_type)
    families = ("Forgejo",) if flavor == "forgejo" else ("Gitea", "Gogs")
    headers = {"User-Agent": "Go-http-client/1.1"}
    for family in families:
        headers[f"X-{family}-Delivery"] = delivery_id
        headers[f"X-{family}-Event"] = coarse
        headers[f"X-{family}-Event-Type"] = event_type
        headers[f"X-{family}-Signature"] = signature
    headers |= {
        "X-Hub-Signature-256": f"sha256={signature}",
        "X-Hub-Signature": "sha1="
        + (hmac.new(hook.secret.encode(), body, hashlib.sha1).hexdigest() if hook.secret else ""),
        "X-GitHub-Delivery": delivery_id,
        "X-GitHub-Event": coarse,
        "X-GitHub-Event-Type": event_type,
        "X-GitHub-Hook-Installation-Target-Type": "repository",
    }
    if flavor == "gitea":
        headers["X-Gitea-Hook-Installation-Target-Type"] = "repository"
    if hook.content_type == "form":
        # A form hook signs the JSON, not the form body it sends (as Gitea does).
        wire = urlencode({"payload": body.decode()}).encode()
        headers["Content-Type"] = "application/x-www-form-urlencoded"
    else:
        wire = body
        headers["Content-Type"] = "application/json"
    return Delivery(delivery_id, event_type, hook.url, wire, headers)


class Outbox:
    """Deliveries in the order they were made, sent one at a time by a thread of their own,
    so the forge's own lock is never held across a webhook's HTTP round trip."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self.deliveries: list[Delivery] = []
        self._queue: queue.Queue[Delivery | None] = queue.Queue()
        self._pending = 0
        self._sender: threading.Thread | None = None

    def send(self, delivery: Delivery) -> None:
        with self._lock:
            self.deliveries.append(delivery)
            self._pending += 1
            if self._sender is None:
                self._sender = threading.Thread(target=self._deliver_loop, name="devforge-hooks", daemon=True)
                self._sender.start()
        self._queue.put(delivery)

    def replay(self, delivery: Delivery) -> Delivery:
        """Gitea's UI Replay: the stored payload again, under a new UUID."""
        new_id = str(uuid.uuid4())
        headers = {k: (new_id if k.endswith("Delivery") else v) for k, v in delivery.headers.items()}
        copy = Delivery(new_id, delivery.event_type, delivery.url, delivery.body, headers)
        self.send(copy)
        return copy

    def _deliver_loop(self) -> None:
        # At most once, no retry, 5 s for the whole request: as Gitea delivers.
        with httpx.Client(timeout=DELIVER_TIMEOUT) as client:
            while True:
                delivery = self._queue.get()
                if delivery is None:
                    return
                try:
                    response = client.post(delivery.url, content=delivery.body, headers=delivery.headers)
                    delivery.status = response.status_code
                    delivery.response = response.text[: 1024 * 1024]
                except httpx.HTTPError as exc:
                    delivery.error = f"{type(exc).__name__}: {exc}"
                with self._idle:
                    self._pending -= 1
                    self._idle.notify_all()

    def wait(self, timeout: float = 10.0) -> list[Delivery]:
        """Block until every queued delivery was sent (or failed); return them all."""
        with self._idle:
            if not self._idle.wait_for(lambda: self._pending == 0, timeout=timeout):
                raise TimeoutError(f"{self._pending} webhook deliveries still pending")
            return list(self.deliveries)

    def close(self) -> None:
        if self._sender is not None:
            self._queue.put(None)
            self._sender.join(timeout=DELIVER_TIMEOUT + 1)
