"""Running git for devforge: a clean environment, plumbing commands with a timeout."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Mapping


def git_env() -> dict[str, str]:
    # A clean, predictable git: no user or system config, fixed identity.
    return {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": "/nonexistent",
        "GIT_CONFIG_NOSYSTEM": "1",
        "GIT_CONFIG_GLOBAL": "/dev/null",
        "GIT_AUTHOR_NAME": "devforge",
        "GIT_AUTHOR_EMAIL": "devforge@devforge.local",
        "GIT_COMMITTER_NAME": "devforge",
        "GIT_COMMITTER_EMAIL": "devforge@devforge.local",
        "LC_ALL": "C",
    }


def git(args: list[str], *, env: Mapping[str, str] | None = None) -> None:
    subprocess.run(["git", *args], check=True, env=dict(env or git_env()), capture_output=True, timeout=60)


def git_out(
    args: list[str], *, env: Mapping[str, str] | None = None, stdin: bytes | None = None, check: bool = True
) -> str:
    """git's stripped stdout; with ``check=False`` a failing command gives ``""``."""
    proc = subprocess.run(
        ["git", *args], check=check, env=dict(env or git_env()), input=stdin, capture_output=True, timeout=60
    )
    return proc.stdout.decode().strip() if proc.returncode == 0 else ""
