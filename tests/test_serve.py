"""``serve`` as an operator runs it: one clear line and exit 1 for what stops it, a lock on the
state dir, and a /healthz that says when the forge cannot be used."""

from __future__ import annotations

import json
import socket
from collections.abc import Callable

import httpx

from tests.conftest import Forge, ServeProcess, post_webhook, sign, wait_until


def failed(serve: ServeProcess) -> str:
    assert serve.proc is not None
    assert serve.proc.wait(timeout=60) == 1
    text = serve.log.read_text()
    assert "Traceback" not in text and " serving on" not in text, text
    return text


def test_a_second_serve_on_the_same_state_is_refused(serve_factory: Callable[..., ServeProcess]) -> None:
    first = serve_factory().start()
    second = serve_factory()
    second.config.write_text(first.config.read_text().replace(f":{first.port}", f":{second.port}"))
    second.start(wait=False)
    assert first.proc is not None
    assert f"another serve (pid {first.proc.pid}) is using {first.state_dir}" in failed(second)
    assert httpx.get(f"{first.url}/healthz", timeout=10).status_code == 200
    assert first.stop() == 0


def test_an_address_in_use_is_one_line(serve_factory: Callable[..., ServeProcess]) -> None:
    serve = serve_factory()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", serve.port))
        taken.listen()
        serve.start(wait=False)
        assert f"cannot listen on 127.0.0.1:{serve.port}" in failed(serve)


def test_a_refused_token_stops_serve(serve_factory: Callable[..., ServeProcess]) -> None:
    serve = serve_factory()
    (serve.home / "token").write_text("0" * 40)
    serve.start(wait=False)
    assert "the forge refused the token (401)" in failed(serve)


def test_healthz_says_503_while_the_forge_is_unreachable(
    forge: Forge, serve_factory: Callable[..., ServeProcess]
) -> None:
    serve = serve_factory().start()
    assert httpx.get(f"{serve.url}/healthz", timeout=10).json()["status"] == "ok"
    forge.server.stop()
    body = json.dumps(
        {
            "action": "opened",
            "issue": {"number": 1, "labels": [{"name": "bot-bottle:happy"}]},
            "repository": {"name": forge.repo, "owner": {"login": forge.owner}},
            "sender": {"login": forge.world.member.login},
        }
    ).encode()
    assert post_webhook(serve.url, body, "issues", signature=sign(body)).status_code == 202

    def unavailable() -> dict[str, str] | None:
        answer = httpx.get(f"{serve.url}/healthz", timeout=10)
        return answer.json() if answer.status_code == 503 else None

    health = wait_until(unavailable, timeout=60, what="/healthz to say 503")
    assert health is not None and health["status"] == "unavailable" and "unreachable" in health["problem"]
    assert serve.stop() == 0
