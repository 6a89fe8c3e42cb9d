"""The audit record (DESIGN.md §8): provenance, its chain, the read API, metrics, logs."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import sqlite3
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

import metrics as m
from config import Secret
from metrics import BUCKETS, Metrics
from statemachine import BottleState
from store import Store
from tests.conftest import ROOT, Forge, Rig, ServeProcess, needs_bwrap, wait_until
from web import create_app

pytestmark = needs_bwrap
API_TOKEN = "read-api-" + "7" * 20


def provenance_cli(state_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FORGE")}
    env["FORGEBOTTLE_STATE_DIR"] = str(state_dir)
    return subprocess.run(
        [sys.executable, str(ROOT / "forgebottle.py"), "provenance", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def two_runs(rig: Rig) -> str:
    issue, state = rig.run_once()
    assert state.pr_number is not None
    rig.forge.dev.comment(
        rig.forge.owner, rig.forge.repo, state.pr_number, "PLEASE-AGAIN", user=rig.forge.world.member.login
    )
    rig.wait_state(issue.number, BottleState.FROZEN, runs=2)
    return state.slug


def get(rig: Rig, path: str, **headers: str) -> httpx.Response:
    return httpx.get(f"{rig.url}{path}", headers=headers, timeout=10)


def test_provenance_of_two_runs(rig: Rig) -> None:
    slug = two_runs(rig)
    doc = get(rig, f"/provenance/{slug}").json()
    state = rig.store.by_slug(slug)
    assert state is not None
    assert doc["schema"] == "forgebottle.provenance/v1"
    assert (doc["slug"], doc["agent"], doc["bottles"], doc["backend"]) == (slug, "happy", ["local"], "local")
    assert (doc["sandbox"], doc["org"], doc["status"]) == ("bwrap", rig.forge.world.org, "frozen")
    assert doc["forge"] == {
        "kind": "gitea",
        "api_url": rig.forge.api,
        "owner": rig.forge.owner,
        "repo": rig.forge.repo,
        "issue": 1,
        "pr": state.pr_number,
        "issue_url": state.issue_url,
        "pr_url": state.pr_url,
    }
    first, second = doc["runs"]
    assert (first["n"], first["trigger"], second["n"], second["trigger"]) == (1, "issues", 2, "pull_request_comment")
    for run in doc["runs"]:
        assert len(run["prompt_sha256"]) == 64 and run["started_at"] <= run["ended_at"]
        assert run["exit_code"] == 0 and run["watchdog_fired"] is False
        assert run["signalled"]["status"] == "success"
        assert run["secret_scan"] == {"tool": "detect-secrets", "findings": 0}
        assert run["egress"] == {"network": "none"}
    prompt1 = (rig.state_dir / "bottles" / slug / "prompt-1.md").read_bytes()
    import hashlib

    assert first["prompt_sha256"] == hashlib.sha256(prompt1).hexdigest()
    ops = doc["operations"]
    assert [o["seq"] for o in ops] == list(range(1, len(ops) + 1))
    assert [o["op"] for o in ops] == [
        "read_issue",
        "post_comment",
        "push",
        "open_pr",
        "signal_done",
        "whoami",
        "post_comment",
        "signal_done",
    ]
    assert [o["run"] for o in ops] == [1] * 5 + [2] * 3
    assert ops[1]["detail"] == "posted comment to #1" and ops[1]["target"] == "#1" and ops[1]["outcome"] == "ok"
    assert set(ops[0]) == {"seq", "run", "at", "op", "target", "outcome", "detail", "duration_ms", "hash"}
    assert [(t["trigger"], t["source"], t["dest"]) for t in doc["transitions"]] == [
        ("launch", "queued", "running"),
        ("done", "running", "frozen"),
        ("rehydrate", "frozen", "running"),
        ("done", "running", "frozen"),
    ]
    assert doc["chain"] == {"algorithm": "sha256", "head": ops[-1]["hash"], "verified": True}
    assert provenance_cli(rig.state_dir, slug).returncode == 0
    assert json.loads(provenance_cli(rig.state_dir, slug, "--json").stdout) == doc
    verified = provenance_cli(rig.state_dir, slug, "--verify")
    assert verified.returncode == 0 and "chain verified (8 operations" in verified.stdout


@pytest.mark.parametrize("tamper", ["edit", "delete-middle", "delete-last", "reorder"])
def test_tampering_is_detected(rig: Rig, tamper: str) -> None:
    slug = two_runs(rig)
    with sqlite3.connect(rig.state_dir / "bot-bottle.db") as db:
        if tamper == "edit":
            db.execute("UPDATE operations SET detail = 'read issue #1' WHERE slug = ? AND seq = 3", (slug,))
        elif tamper == "delete-middle":
            db.execute("DELETE FROM operations WHERE slug = ? AND seq = 3", (slug,))
        elif tamper == "delete-last":
            db.execute("DELETE FROM operations WHERE slug = ? AND seq = 8", (slug,))
        else:
            db.execute("UPDATE operations SET at = '2000-01-01' WHERE slug = ? AND seq = 3", (slug,))
    doc = get(rig, f"/provenance/{slug}").json()
    assert doc["chain"]["verified"] is False
    result = provenance_cli(rig.state_dir, slug, "--verify")
    assert result.returncode == 1
    expected = 8 if tamper == "delete-last" else 3
    assert f"chain broken at operation {expected}" in result.stderr
    assert "Traceback" not in result.stderr


def test_watchdog_run_in_provenance(rig_factory: Callable[..., Rig]) -> None:
    rig = rig_factory(watchdog_timeout=0.5, watchdog_interval=0.1).start()
    _, state = rig.run_once(agent="sleep")
    run = get(rig, f"/provenance/{state.slug}").json()["runs"][0]
    assert run["watchdog_fired"] is True and run["signalled"] is None


@pytest.mark.parametrize("slug", ["..%2f..", "..", "%2e%2e", "a/b", "UPPER", "x" * 300, "nope", "-x", "a%00b"])
def test_hostile_or_unknown_slugs_are_404(rig: Rig, slug: str) -> None:
    # Sent as written: an HTTP client would fold "/provenance/.." into "/" (the status page).
    host, port = rig.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(f"GET /provenance/{slug} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    assert answer.split(b" ", 2)[1] == b"404", answer[:200]
    for path in (f"/provenance/{slug}", f"/bottles/{slug}"):
        assert httpx.get(f"{rig.url}{path}", timeout=10).status_code in (404, 200 if slug == ".." else 404)


def test_read_api_needs_the_bearer_token_when_configured(rig_factory: Callable[..., Rig]) -> None:
    rig = rig_factory(api_token=Secret(API_TOKEN)).start()
    for path in ("/api/bottles", "/api/events", "/metrics", "/provenance/x"):
        assert get(rig, path).status_code == 401
        assert get(rig, path, Authorization="Bearer wrong").status_code == 401
        assert get(rig, path, Authorization=f"Basic {API_TOKEN}").status_code == 401
    assert get(rig, "/api/bottles", Authorization=f"Bearer {API_TOKEN}").json() == []
    assert get(rig, "/healthz").json()["status"] == "ok"


def test_read_api_is_loopback_only_without_a_token(forge: Forge, short_tmp: Path) -> None:
    from config import Config
    from gitea import Gitea
    from service import Service

    config = Config(api_url=forge.api, token=Secret("t"), webhook_secret=Secret("s"), state_dir=short_tmp / "s")
    store = Store(short_tmp / "db")
    app = create_app(config, Service(config, store, Gitea(forge.api, "t")))

    async def ask(client_host: str) -> list[int]:
        # The peer address is the transport's: an ASGI transport lets us be a remote client.
        transport = httpx.ASGITransport(app=app, client=(client_host, 40000))
        async with httpx.AsyncClient(transport=transport, base_url="http://forgebottle") as http:
            return [
                (await http.get(p)).status_code
                for p in ("/api/bottles", "/api/events", "/metrics", "/provenance/x", "/", "/bottles/x", "/healthz")
            ]

    # /healthz answers anyone: 503 here, as this service never started (so never reached its forge).
    assert asyncio.run(ask("203.0.113.9")) == [403, 403, 403, 403, 403, 403, 503]
    assert asyncio.run(ask("::1")) == [200, 200, 200, 404, 200, 404, 503]
    assert asyncio.run(ask("127.0.0.5")) == [200, 200, 200, 404, 200, 404, 503]


def test_bottles_events_and_metrics(rig: Rig) -> None:
    slug = two_runs(rig)
    bottles = get(rig, "/api/bottles").json()
    assert [(b["slug"], b["status"], b["branch"]) for b in bottles] == [(slug, "frozen", "bot-bottle/issue-1")]
    events = get(rig, "/api/events?limit=500").json()
    assert events[0]["id"] > events[-1]["id"]  # newest first
    assert {e["status"] for e in events} <= {"done", "ignored", "failed"}
    assert any("own user" in e["reason"] for e in events)
    assert get(rig, "/api/events?limit=x").status_code == 400
    text = get(rig, "/metrics").text
    for needle in (
        'forgebottle_webhooks_total{outcome="queued"}',
        'forgebottle_bottles{state="frozen"} 1',
        'forgebottle_sidecar_calls_total{method="post_comment",outcome="ok"} 2',
        "forgebottle_sidecar_call_seconds_bucket",
        "forgebottle_run_seconds_count 2",
        "forgebottle_webhook_seconds_count",
        'forgebottle_transitions_total{trigger="rehydrate"} 1',
    ):
        assert needle in text, needle
    assert rig.forge.world.bot.token not in text


def test_histograms_are_cumulative_with_inclusive_bounds() -> None:
    metrics = Metrics()
    for seconds in (0.0005, 0.001, 0.003, 0.2, 100.0):
        metrics.observe(m.RUN_SECONDS, seconds, method="x")
    lines = metrics.render({}).splitlines()
    buckets = {line.split('le="')[1].split('"')[0]: float(line.split()[-1]) for line in lines if "_bucket" in line}
    assert list(buckets) == [f"{b:g}" for b in BUCKETS] + ["+Inf"]
    assert buckets["0.001"] == 2  # le is inclusive: 0.001 counts
    assert buckets["0.005"] == 3 and buckets["0.1"] == 3 and buckets["0.5"] == 4 and buckets["30"] == 4
    assert buckets["+Inf"] == 5
    assert 'forgebottle_run_seconds_count{method="x"} 5' in lines
    assert 'forgebottle_run_seconds_sum{method="x"} 100.204500' in lines


def test_logs_are_json_lines_without_secrets(forge: Forge, serve_factory: Callable[..., ServeProcess]) -> None:
    serve = serve_factory().start()
    forge.dev.add_hook(forge.owner, forge.repo, f"{serve.url}/webhook", "whsec-" + "5" * 24)
    member = forge.world.member.login
    forge.dev.create_issue(
        forge.owner, forge.repo, title="t", body="", user=member, labels=["bot-bottle:happy"], assignees=[member]
    )
    store = Store(serve.state_dir / "bot-bottle.db")
    wait_until(
        lambda: (s := store.get(forge.owner, forge.repo, 1)) is not None and s.status is BottleState.FROZEN,
        what="the run",
    )
    doc = httpx.get(f"{serve.url}/provenance/{store.all()[0].slug}").json()
    metrics = httpx.get(f"{serve.url}/metrics").text
    assert serve.stop() == 0
    lines = serve.log.read_text().splitlines()
    entries: list[dict[str, Any]] = [json.loads(line) for line in lines]
    assert all({"ts", "level", "logger", "msg"} <= set(e) for e in entries)
    slug = doc["slug"]
    assert any(e.get("event") == "issues" and e.get("status") == "done" for e in entries)  # webhook decision
    assert any(e.get("trigger") == "launch" and e.get("slug") == slug for e in entries)  # transition
    # Every sidecar call is logged (after its answer), once each, in call order.
    logged = [(e["op"], e["msg"]) for e in entries if e.get("slug") == slug and "op" in e]
    assert logged == [(o["op"], f"{slug}: {o['detail']}") for o in doc["operations"]]
    assert "push" in [op for op, _ in logged]
    for secret in (forge.world.bot.token, "whsec-" + "5" * 24):
        assert secret not in serve.log.read_text()
        assert secret not in json.dumps(doc)
        assert secret not in metrics


def test_the_summary_shows_usage_and_egress(tmp_path: Path) -> None:
    from provenance import provenance, summary
    from store import ForgeState

    store = Store(tmp_path / "db")
    store.upsert(ForgeState("o", "r", 1, "o-r-1", "a", BottleState.FROZEN, "t", "t"))
    store.start_run(
        "o-r-1", trigger="issues", prompt_sha256="0" * 64, started_at="t", network="gateway", sandbox="bwrap"
    )
    store.append_operation(
        "o-r-1",
        run=1,
        at="t",
        op="model",
        target="m:443",
        outcome="ok",
        detail="d",
        duration_ms=1.0,
        data={"model": "m", "host": "m", "port": 443, "usage": {"input_tokens": 1200, "output_tokens": 34}},
    )
    store.append_operation(
        "o-r-1",
        run=1,
        at="t",
        op="egress",
        target="evil.test:443",
        outcome="denied",
        detail="d",
        duration_ms=0.0,
        data={"host": "evil.test", "port": 443, "reason": "not allowed"},
    )
    text = summary(provenance(store, "o-r-1"))
    assert "      model m: 1 calls, 1200 tokens in, 34 out" in text
    assert "      egress: " in text and "1 refused" in text
    assert text.splitlines()[-1].startswith("  chain verified: 2 operations")
    store.close()
