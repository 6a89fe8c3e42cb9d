"""The egress gateway from inside real bwrap bottles (DESIGN.md §10).

Each agent below probes the network from inside its bottle with real clients (``curl``, Python
``urllib``, ``git clone``) and writes what it saw to ``$HOME/probe.txt``; the tests then read
that, the bottle's hash-chained record, its provenance and the forge. Local servers stand in for
the internet and are reached by names mapped in ``egress.resolve``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import ssl
import subprocess
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import trustme

from config import EgressSpec, ModelSpec, Secret
from provenance import bottle_views, provenance
from statemachine import BottleState
from tests.conftest import Forge, Rig, needs_bwrap, read_when
from tests.test_egress import MODEL_KEY, Upstream, figures

pytestmark = needs_bwrap

DOWNLOAD = 4 * 1024 * 1024

# Runs inside the bottle. Every probe prints key=value; nothing here decides, the host does.
PROBE_AGENT = r"""#!/bin/sh
out="$HOME/probe.txt"
: > "$out"
say() { echo "$1" >> "$out"; }
env > "$HOME/env.txt"
code() { curl -sS --max-time 20 -o /dev/null -w '%{http_code}/%{http_connect}' "$@" 2>/dev/null; }
# Through the gateway even for loopback spellings (NO_PROXY would send those nowhere at all).
viaproxy() { (unset NO_PROXY no_proxy; code "$@"); }
say "tls_allowed=$(code "https://allowed.test:$TLS_PORT/hello")"
say "tls_body=$(curl -sS --max-time 20 "https://allowed.test:$TLS_PORT/hello")"
say "tls_other=$(code "https://other.test:$TLS_PORT/")"
say "tls_blocked=$(code "https://blocked.test:$TLS_PORT/")"
say "plain_allowed=$(code "http://plain.test:$PLAIN_PORT/x")"
say "download=$(curl -sS --max-time 60 "http://plain.test:$PLAIN_PORT/bytes/$DOWNLOAD" | wc -c)"
for spelling in 127.0.0.1 2130706433 0x7f.1 0177.0.0.1 localhost '[::1]' '[::ffff:127.0.0.1]'; do
  say "ssrf_http_$spelling=$(viaproxy "http://$spelling:$PLAIN_PORT/")"
  say "ssrf_tls_$spelling=$(viaproxy "https://$spelling:$TLS_PORT/")"
done
direct() { curl -sS --noproxy '*' --max-time 5 -o /dev/null -w '%{http_code}' "$@" 2>/dev/null; }
say "direct_host=$(direct "http://127.0.0.1:$FORGE_PORT/")"
python3 - >> "$out" <<'PY'
import json, os, socket, ssl, urllib.request, urllib.error
ctx = ssl.create_default_context(cafile=os.environ["SSL_CERT_FILE"])
try:
    with urllib.request.urlopen(f"https://allowed.test:{os.environ['TLS_PORT']}/hello", context=ctx, timeout=20) as r:
        print(f"urllib_tls={r.status}")
except OSError as exc:
    print(f"urllib_tls=error {type(exc).__name__}")
for port in (os.environ["FORGE_PORT"], os.environ["PLAIN_PORT"]):
    try:
        socket.create_connection(("127.0.0.1", int(port)), timeout=3).close()
        print(f"direct_{port}=open")
    except OSError:
        print(f"direct_{port}=blocked")
base = os.environ.get("ANTHROPIC_BASE_URL")
if base:
    for n, stream in enumerate((False, True, False)):
        request = urllib.request.Request(
            base + "/v1/messages",
            data=json.dumps({"model": "m", "stream": stream, "messages": []}).encode(),
            headers={"content-type": "application/json", "x-api-key": os.environ["ANTHROPIC_API_KEY"]},
        )
        try:
            with urllib.request.urlopen(request, timeout=20) as r:
                r.read()  # the whole answer, as an agent reads it
                print(f"model_{n}={r.status}")
        except urllib.error.HTTPError as exc:
            print(f"model_{n}={exc.code} {json.loads(exc.read())['error']['budget']}")
PY
if git clone -q "https://allowed.test:$TLS_PORT/files/repo.git" "$HOME/clone" 2>"$HOME/clone.err" \
   && [ -f "$HOME/clone/README" ]; then
  say "git_clone=ok"
else
  say "git_clone=failed"
fi
index="https://allowed.test:$TLS_PORT/files/simple/"
if pip3 download -q --no-deps --disable-pip-version-check --index-url "$index" --cert "$SSL_CERT_FILE" \
     -d "$HOME/dl" fbdemo 2>"$HOME/pip.err" && [ -f "$HOME/dl/fbdemo-1.0-py3-none-any.whl" ]; then
  say "pip_download=ok"
else
  say "pip_download=failed"
fi
forge done success probed
"""


def package_index(root: Path) -> None:
    """``root/simple/fbdemo/``: a PEP 503 index of one small wheel, servable as static files."""
    wheel = root / "simple" / "fbdemo" / "fbdemo-1.0-py3-none-any.whl"
    wheel.parent.mkdir(parents=True)
    files = {
        "fbdemo/__init__.py": "",
        "fbdemo-1.0.dist-info/METADATA": "Metadata-Version: 2.1\nName: fbdemo\nVersion: 1.0\n",
        "fbdemo-1.0.dist-info/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = "".join(f"{name},,\n" for name in files) + "fbdemo-1.0.dist-info/RECORD,,\n"
    with zipfile.ZipFile(wheel, "w") as archive:
        for name, text in {**files, "fbdemo-1.0.dist-info/RECORD": record}.items():
            archive.writestr(name, text)
    link = f'<a href="{wheel.name}#sha256={hashlib.sha256(wheel.read_bytes()).hexdigest()}">{wheel.name}</a>'
    (wheel.parent / "index.html").write_text(f"<!DOCTYPE html><html><body>{link}</body></html>")
    (root / "simple" / "index.html").write_text('<!DOCTYPE html><html><body><a href="fbdemo/">fbdemo</a></body></html>')


def dumb_git_repository(root: Path) -> Path:
    """``root/repo.git``: a bare repository with one commit, servable as static files."""
    work = root / "work"
    env = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
    env |= {"PATH": os.environ["PATH"], "HOME": str(root)}
    subprocess.run(["git", "init", "-q", str(work)], check=True, env=env)
    (work / "README").write_text("cloned through the gateway\n")
    subprocess.run(["git", "-C", str(work), "add", "README"], check=True, env=env)
    subprocess.run(["git", "-C", str(work), "commit", "-q", "-m", "one"], check=True, env=env)
    subprocess.run(["git", "clone", "-q", "--bare", str(work), str(root / "repo.git")], check=True, env=env)
    subprocess.run(["git", "-C", str(root / "repo.git"), "update-server-info"], check=True, env=env)
    return root.resolve()


class GatewayRig(Rig):
    """A ``Rig`` whose agents get the network, model and egress the test gives them."""

    def __init__(self, forge: Forge, state_dir: Path, *, agents: dict[str, dict[str, Any]], **kwargs: Any) -> None:
        self.agent_settings = agents
        super().__init__(forge, state_dir, **kwargs)

    def _config(self) -> Any:
        config = super()._config()
        agents = dict(config.agents)
        for name, settings in self.agent_settings.items():
            agents[name] = dataclasses.replace(agents[name], **settings)
        return dataclasses.replace(config, agents=agents)


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def upstreams(ca: trustme.CA) -> Iterator[tuple[Upstream, Upstream]]:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("allowed.test", "blocked.test", "other.test").configure_cert(context)
    tls, plain = Upstream(context), Upstream()
    tls.files = dumb_git_repository(Path(tempfile.mkdtemp(prefix="fb-git-", dir="/tmp")))
    package_index(tls.files)
    yield tls, plain
    shutil.rmtree(tls.files, ignore_errors=True)
    tls.close()
    plain.close()


@pytest.fixture
def gateway_rig(
    forge: Forge, short_tmp: Path, ca: trustme.CA, upstreams: tuple[Upstream, Upstream]
) -> Iterator[Callable[..., GatewayRig]]:
    made: list[GatewayRig] = []
    tls, plain = upstreams
    ca_dir = short_tmp / "ca"
    ca_dir.mkdir()
    ca.cert_pem.write_to_path(str(ca_dir / "ca.pem"))

    def make(
        network: str = "gateway",
        *,
        egress: EgressSpec | None = None,
        script: str = PROBE_AGENT,
        settings: dict[str, Any] | None = None,
        extra_env: dict[str, str] | None = None,
        **agent: Any,
    ) -> GatewayRig:
        """Started, with one agent "probe" running ``script`` on ``network``, its other settings
        ``agent``; ``settings`` override the service's config."""
        names = ("allowed.test", "blocked.test", "other.test", "plain.test", "mirror.test", "model.test")
        limits = egress or EgressSpec(
            allow=(
                f"allowed.test:{tls.port}",
                f"blocked.test:{tls.port}",
                f"plain.test:{plain.port}",
            ),
            block=("blocked.test",),
            resolve=tuple((name, "127.0.0.1") for name in names),
        )
        env = {
            "TLS_PORT": str(tls.port),
            "PLAIN_PORT": str(plain.port),
            "FORGE_PORT": str(forge.server.port),
            "DOWNLOAD": str(DOWNLOAD),
            "REPO_PATH": f"{forge.owner}/{forge.repo}",
            "SSL_CERT_FILE": str(ca_dir / "ca.pem"),
            "CURL_CA_BUNDLE": str(ca_dir / "ca.pem"),
            "GIT_SSL_CAINFO": str(ca_dir / "ca.pem"),
            **(extra_env or {}),
        }
        model = ModelSpec("claude", "anthropic", f"http://model.test:{plain.port}", "env:X", Secret(MODEL_KEY))
        rig = GatewayRig(
            forge,
            short_tmp / f"state{len(made)}",
            scripts={"probe": script},
            agent_env=env,
            agents={"probe": {"network": network, "ro_binds": (str(ca_dir),), **agent}},
            egress=limits,
            models={"claude": model},
            **(settings or {}),
        )
        made.append(rig)
        rig.start()
        return rig

    yield make
    for rig in made:
        rig.stop()


def probe(rig: GatewayRig) -> tuple[dict[str, str], str]:
    _, state = rig.run_once(agent="probe")
    text = read_when(rig.home(state.slug) / "probe.txt")
    return dict(line.split("=", 1) for line in text.splitlines() if "=" in line), state.slug


def forge_text(rig: Rig) -> str:
    """Everything on the forge a person could read: issue and PR bodies and comments."""
    repo = rig.forge.dev.repo(rig.forge.owner, rig.forge.repo)
    parts = []
    for issue in repo.issues.values():
        parts += [issue.title, issue.body, *(c.body for c in issue.comments)]
    return "\n".join(parts)


def test_gateway_bottle_reaches_what_is_allowed_and_nothing_else(
    gateway_rig: Callable[..., GatewayRig], upstreams: tuple[Upstream, Upstream]
) -> None:
    tls, plain = upstreams
    rig = gateway_rig(model="claude")
    seen, slug = probe(rig)
    # Allowed, with TLS verified end to end against the test CA the bottle trusts.
    assert seen["tls_allowed"] == "200/200" and seen["tls_body"] == "hello from upstream"
    assert seen["urllib_tls"] == "200"
    assert seen["tls_other"] == "000/403" and seen["tls_blocked"] == "000/403"
    assert seen["plain_allowed"] == "200/000"
    assert int(seen["download"]) == DOWNLOAD
    ssrf = {k: v for k, v in seen.items() if k.startswith("ssrf_")}
    assert len(ssrf) == 14
    assert all(v in ("403/000", "000/403", "400/000", "000/400") for v in ssrf.values()), ssrf
    # Nothing but the gateway: the host's loopback listeners are not there.
    assert seen["direct_host"] == "000"
    assert seen[f"direct_{rig.forge.server.port}"] == "blocked" and seen[f"direct_{plain.port}"] == "blocked"
    assert seen["git_clone"] == "ok", (rig.home(slug) / "clone.err").read_text()
    assert seen["pip_download"] == "ok", (rig.home(slug) / "pip.err").read_text()
    # The model route: the real key reached the upstream, the bottle only the placeholder.
    assert (seen["model_0"], seen["model_1"], seen["model_2"]) == ("200", "200", "200")
    assert [h["x-api-key"] for h in plain.seen] == [MODEL_KEY] * 3
    env = (rig.home(slug) / "env.txt").read_text()
    assert "ANTHROPIC_API_KEY=forgebottle-gateway" in env
    assert "ANTHROPIC_BASE_URL=http://127.0.0.1:3128/models/claude" in env
    assert "HTTPS_PROXY=http://127.0.0.1:3128" in env and "NO_PROXY=127.0.0.1,localhost" in env

    # The record: every connection and denial, chained, summed in provenance.
    rig.wait_state(1, BottleState.FROZEN, runs=1)
    doc = provenance(rig.store, slug)
    assert doc["chain"]["verified"]
    run = doc["runs"][0]
    hosts = {(h["host"], h["port"]): h for h in run["egress"]["hosts"]}
    assert hosts[("allowed.test", tls.port)]["connections"] >= 2
    downloads = [
        op["data"]["bytes_down"]
        for op in doc["operations"]
        if op["op"] == "egress" and op["outcome"] == "ok" and op["data"]["bytes_down"] >= DOWNLOAD
    ]
    assert downloads and abs(downloads[0] - DOWNLOAD) <= DOWNLOAD * 0.01, downloads
    denied = run["egress"]["denied"]
    assert {"host": "other.test", "port": tls.port, "reason": f"other.test:{tls.port} is not allowed"} in denied
    assert any(d["host"] == "blocked.test" for d in denied)
    assert len(denied) >= 1 + 1 + len(ssrf)
    usage = run["usage"]["claude"]
    assert usage == {"requests": 3, "input_tokens": 3600, "output_tokens": 1035, "cache_read_input_tokens": 3000}
    assert bottle_views(rig.store, [rig.store.by_slug(slug)])[0]["egress_denied"] == len(denied)  # type: ignore[list-item]
    api = httpx.get(f"{rig.url}/api/bottles", timeout=10).json()
    assert api[0]["egress_denied"] == len(denied)

    # The key is nowhere the bottle could see it.
    key = MODEL_KEY.encode()
    bottle = rig.state_dir / "bottles" / slug
    places = [p for p in bottle.rglob("*") if p.is_file() and not p.is_symlink()]
    places += [p for p in (rig.state_dir / "sidecars").rglob("*") if p.is_file()]
    hits = [p for p in places if key in p.read_bytes()]
    assert not hits and key not in json.dumps(doc).encode()
    # And nothing of the egress record was posted to the forge.
    text = forge_text(rig)
    for word in ("allowed.test", "other.test", "blocked.test", "egress", "denied", "input_tokens"):
        assert word not in text, word
    figures(
        "egress_bottle",
        ok=sum(h["connections"] for h in hosts.values()),
        denied=len(denied),
        download=downloads[0],
        key_places=len(places),
        key_hits=len(hits),
        usage=usage,
    )


def test_none_bottle_reaches_nothing(gateway_rig: Callable[..., GatewayRig]) -> None:
    rig = gateway_rig("none")
    seen, slug = probe(rig)
    assert seen["tls_allowed"] == "000/000" and seen["plain_allowed"] == "000/000"
    assert seen["urllib_tls"].startswith("error") and seen["git_clone"] == "failed"
    assert seen[f"direct_{rig.forge.server.port}"] == "blocked"
    assert "HTTPS_PROXY" not in (rig.home(slug) / "env.txt").read_text()
    assert not [op for op in rig.store.operations(slug) if op.op in ("egress", "model")]
    figures("egress_none_bottle", reachable=0)


def test_budget_spent_inside_a_bottle_answers_429(
    gateway_rig: Callable[..., GatewayRig], upstreams: tuple[Upstream, Upstream]
) -> None:
    _, plain = upstreams
    rig = gateway_rig(model="claude", budget_tokens=2000)
    seen, slug = probe(rig)
    assert (seen["model_0"], seen["model_1"], seen["model_2"]) == ("200", "200", "429 budget_tokens")
    assert len(plain.seen) == 2
    rig.wait_state(1, BottleState.FROZEN, runs=1)
    run = provenance(rig.store, slug)["runs"][0]
    assert run["budget"] == {"tokens": 2000, "used": 3090, "exhausted": True}
    figures("egress_budget_bottle", budget=2000, used=run["budget"]["used"], third_call=seen["model_2"])


READ_ONLY_AGENT = r"""#!/bin/sh
out="$HOME/probe.txt"
: > "$out"
code() { curl -sS --max-time 20 -o /dev/null -w '%{http_code}' "$@" 2>/dev/null; }
echo "get=$(code "http://plain.test:$PLAIN_PORT/x")" >> "$out"
echo "post=$(code -d payload "http://plain.test:$PLAIN_PORT/echo")" >> "$out"
echo "model_post=$(code -d '{}' -H 'content-type: application/json' "$ANTHROPIC_BASE_URL/v1/messages")" >> "$out"
echo "tls_get=$(code "https://allowed.test:$TLS_PORT/hello")" >> "$out"
forge done success probed
"""


def test_read_only_refuses_writes_from_a_bottle(
    gateway_rig: Callable[..., GatewayRig], upstreams: tuple[Upstream, Upstream]
) -> None:
    tls, plain = upstreams
    limits = EgressSpec(
        allow=(f"plain.test:{plain.port}", f"allowed.test:{tls.port}"),
        read_only=True,
        resolve=(("plain.test", "127.0.0.1"), ("allowed.test", "127.0.0.1"), ("model.test", "127.0.0.1")),
    )
    rig = gateway_rig(egress=limits, script=READ_ONLY_AGENT, model="claude")
    seen, slug = probe(rig)
    assert (seen["get"], seen["post"], seen["model_post"]) == ("200", "403", "403")
    assert seen["tls_get"] == "200"  # a tunnel's contents are TLS: read_only cannot see its methods
    assert plain.received == 0 and not plain.seen
    reasons = [op.data["reason"] for op in rig.store.operations(slug) if op.outcome == "denied" and op.data]
    assert len(reasons) == 2 and all("read-only" in r for r in reasons)
    figures("egress_read_only_bottle", get=seen["get"], post=seen["post"], model_post=seen["model_post"])


BUSY_AGENT = r"""#!/bin/sh
# Silent on stdout, no sidecar calls: only gateway traffic (or nothing) for a while.
i=0
while [ $i -lt 12 ]; do
  [ -n "$QUIET" ] || curl -s -o /dev/null --max-time 5 "http://plain.test:$PLAIN_PORT/x"
  sleep 0.5
  i=$((i + 1))
done
forge done success "kept busy"
"""


@pytest.mark.parametrize("quiet", [False, True])
def test_gateway_traffic_keeps_the_watchdog_away(gateway_rig: Callable[..., GatewayRig], quiet: bool) -> None:
    quiet_env = {"QUIET": "1"} if quiet else {}
    rig = gateway_rig(script=BUSY_AGENT, settings={"watchdog_timeout": 2.5}, extra_env=quiet_env)
    _, state = rig.run_once(agent="probe")
    run = rig.store.runs(state.slug)[0]
    assert bool(run["watchdog_fired"]) is quiet, run
    traffic = [op for op in rig.store.operations(state.slug) if op.op == "egress"]
    assert (len(traffic) >= 10) is not quiet
    figures("egress_watchdog", quiet=quiet, watchdog_fired=bool(run["watchdog_fired"]), requests=len(traffic))
