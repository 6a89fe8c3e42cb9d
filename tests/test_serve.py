"""``serve`` as an operator runs it: one clear line and exit 1 for what stops it, a lock on the
state dir, and a /healthz that says when the forge cannot be used."""

from __future__ import annotations

import json
import socket
import sys
from collections.abc import Callable
from pathlib import Path

import httpx

from tests.conftest import WEBHOOK_SECRET, Forge, ServeProcess, post_webhook, sign, wait_until


def failed(serve: ServeProcess) -> str:
    assert serve.proc is not None
    assert serve.proc.wait(timeout=60) == 1
    text = serve.log.read_text()
    assert "Traceback" not in text and " serving on" not in text, text
    return text


def test_a_second_serve_on_the_same_state_is_refused(serve_factory: Callable[..., ServeProcess], pyz: Path) -> None:
    first = serve_factory(command=[sys.executable, str(pyz)]).start()
    second = serve_factory(command=[sys.executable, str(pyz)])
    second.config.write_text(first.config.read_text().replace(f":{first.port}", f":{second.port}"))
    second.start(wait=False)
    assert first.proc is not None
    assert f"another serve (pid {first.proc.pid}) is using {first.state_dir}" in failed(second)
    assert httpx.get(f"{first.url}/healthz", timeout=10).status_code == 200
    assert first.stop() == 0


def test_an_address_in_use_is_one_line(serve_factory: Callable[..., ServeProcess], pyz: Path) -> None:
    serve = serve_factory(command=[sys.executable, str(pyz)])
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", serve.port))
        taken.listen()
        serve.start(wait=False)
        assert f"cannot listen on 127.0.0.1:{serve.port}" in failed(serve)


def test_a_refused_token_stops_serve(serve_factory: Callable[..., ServeProcess], pyz: Path) -> None:
    serve = serve_factory(command=[sys.executable, str(pyz)])
    (serve.home / "token").write_text("0" * 40)
    serve.start(wait=False)
    assert "the forge refused the token (401)" in failed(serve)


def test_healthz_says_503_while_the_forge_is_unreachable(
    forge: Forge, serve_factory: Callable[..., ServeProcess], pyz: Path
) -> None:
    serve = serve_factory(command=[sys.executable, str(pyz)]).start()
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


def test_sighup_rereads_agents_and_keeps_the_old_config_when_the_new_is_bad(
    forge: Forge, serve_factory: Callable[..., ServeProcess]
) -> None:
    import signal

    from statemachine import BottleState
    from store import Store
    from tests.conftest import open_issue

    serve = serve_factory().start()
    assert serve.proc is not None
    forge.dev.add_hook(forge.owner, forge.repo, f"{serve.url}/webhook", WEBHOOK_SECRET)
    running = open_issue(forge, "turns")  # a bottle that runs until told: SIGHUP must not stop it
    store = Store(serve.state_dir / "bot-bottle.db")

    def state(number: int) -> BottleState | None:
        found = store.get(forge.owner, forge.repo, number)
        return found.status if found else None

    wait_until(lambda: state(running.number) is BottleState.RUNNING, what="the turns bottle to run")
    good = serve.config.read_text()
    serve.config.write_text(good + '[agents.later]\ncommand = ["/bin/sh", "/opt/forgebottle/bin/happy-agent"]\n')
    serve.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: "agents" in serve.log.read_text() and "later" in serve.log.read_text(), what="the re-read")
    later = open_issue(forge, "later")
    wait_until(lambda: state(later.number) is BottleState.FROZEN, timeout=60, what="the new agent's bottle")
    serve.config.write_text(good + "[agents.broken\n")
    serve.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: "config not re-read, the one in use stays" in serve.log.read_text(), what="the refusal")
    assert state(running.number) is BottleState.RUNNING and serve.proc.poll() is None
    assert httpx.get(f"{serve.url}/healthz", timeout=10).status_code == 200
    assert serve.stop() == 0
    store.close()


def test_answers_are_not_held_back_by_nagle() -> None:
    # With Nagle's algorithm on, an answer written in two parts waits for the client's delayed
    # ACK (40 ms on Linux) before its second part leaves: every webhook and API answer did.
    import asyncio

    from serving import bind_listener

    async def check() -> int:
        listener = bind_listener(("127.0.0.1", 0))
        accepted: asyncio.Future[int] = asyncio.get_running_loop().create_future()

        def connected(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            sock = writer.get_extra_info("socket")
            accepted.set_result(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
            writer.close()

        server = await asyncio.start_server(connected, sock=listener)
        _, writer = await asyncio.open_connection(*listener.getsockname()[:2])
        nodelay = await asyncio.wait_for(accepted, 10)
        writer.close()
        server.close()
        await server.wait_closed()
        return nodelay

    assert asyncio.run(check()) == 1
