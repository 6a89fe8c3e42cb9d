"""The status pages rendered by a real browser (headless Chromium, Debian's package)."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from config import Secret
from tests.conftest import Rig, needs_bwrap

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = [needs_bwrap, pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed")]
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1280,900",
]


def browse(url: str, profile: Path, *, screenshot: Path | None = None) -> str:
    """The page's DOM as Chromium rendered it (and a screenshot, if asked)."""
    assert CHROMIUM is not None
    args = [CHROMIUM, *FLAGS, f"--user-data-dir={profile}"]
    if screenshot is not None:
        shot = subprocess.run(
            [*args, f"--screenshot={screenshot}", url], capture_output=True, text=True, timeout=120, check=False
        )
        assert screenshot.exists() and screenshot.stat().st_size > 10_000, shot.stderr[-2000:]
    dom = subprocess.run([*args, "--dump-dom", url], capture_output=True, text=True, timeout=120, check=True)
    return dom.stdout


def test_the_status_pages_render_in_a_browser(rig: Rig, tmp_path: Path, figures: Callable[..., None]) -> None:
    issue, state = rig.run_once()
    outsider_issue = rig.open_issue(assignee=rig.forge.world.outsider.login)
    rig.wait_events_done()
    index = browse(f"{rig.url}/", tmp_path / "profile", screenshot=tmp_path / "index.png")
    assert "<h1>forgebottle</h1>" in index and "Live bottles" in index
    assert f'href="bottles/{state.slug}"' in index and ">frozen<" in index
    assert "success: opened a PR" in index
    assert f"#{state.pr_number}" in index
    assert f"assigned to {rig.forge.world.outsider.login}; none is a member" in index  # an ignored event
    assert outsider_issue.number != issue.number
    page = browse(f"{rig.url}/bottles/{state.slug}", tmp_path / "profile", screenshot=tmp_path / "bottle.png")
    assert f"<h1>{state.slug}</h1>" in page and "Runs" in page and "Operations" in page
    assert f"posted comment to #{issue.number}" in page and "Chain verified" in page
    assert "launch" in page and "done" in page  # transitions
    assert '"html_url"' in page or "html_url" in page  # the run log's tail (the agent's forge output)
    figures("status-page", index=tmp_path / "index.png", bottle=tmp_path / "bottle.png")


def test_the_pages_escape_what_agents_and_users_write(rig_factory: Callable[..., Rig]) -> None:
    rig = rig_factory(api_token=Secret("page-token-123456")).start()
    assert httpx.get(f"{rig.url}/", timeout=10).status_code == 401
    headers = {"Authorization": "Bearer page-token-123456"}
    assert httpx.get(f"{rig.url}/", headers=headers, timeout=10).status_code == 200
    assert httpx.get(f"{rig.url}/bottles/..%2f..%2fetc", headers=headers, timeout=10).status_code == 404
    rig.open_issue(agent="nope<script>alert(1)</script>")
    rig.wait_events_done()
    text = httpx.get(f"{rig.url}/", headers=headers, timeout=10).text
    assert "<script>" not in text and "&lt;script&gt;" in text
