"""The secret scan: what a push or an agent-written text would put on the forge, read whole.

detect-secrets finds the usual suspects; every forgebottle secret, and its base64 and hex, is
searched for too (``config.secret_forms``). What cannot be read whole (past MAX_SCAN_BYTES,
MAX_SCAN_FILES or MAX_SCAN_COMMITS) is a finding itself: the scan refuses, it never skips.
Git runs only in the bottle's mirror, a repository no agent ever wrote.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
import subprocess
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

from config import redact, secret_forms
from statemachine import ForgeBottleError

GIT_TIMEOUT = 300.0
MAX_SCAN_FILES = 2000
MAX_SCAN_COMMITS = 1000
MAX_SCAN_BYTES = 2 * 1024 * 1024


class ScanFailed(ForgeBottleError):
    """git could not read the change; ``detail`` holds its words (not for agents)."""

    def __init__(self, message: str, *, detail: str) -> None:
        super().__init__(message)
        self.detail = detail


def plain_git_env() -> dict[str, str]:
    """git's environment with nothing of the host's configuration and no way to ask anyone."""
    return {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "HOME": "/nonexistent",
        "GIT_CONFIG_NOSYSTEM": "1",
        "GIT_CONFIG_GLOBAL": "/dev/null",
        "GIT_TERMINAL_PROMPT": "0",
        "GIT_ASKPASS": "/bin/false",
        # No git (host or sandbox) may fetch missing objects from a promisor remote on its own.
        "GIT_NO_LAZY_FETCH": "1",
        "LC_ALL": "C",
    }


@dataclasses.dataclass(frozen=True)
class Finding:
    file: str
    line: int
    type: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line} ({self.type})"


def _over_limit(where: str, limit: int, unit: str = "bytes") -> Finding:
    return Finding(where, 0, f"over the scan limit of {limit} {unit}; not pushed")


def _shown(name: bytes, secrets: Sequence[str]) -> str:
    """A path as a finding may show it to the agent: text, printable, short, no secret in it."""
    text = redact(name.decode(errors="replace"), secrets)
    text = "".join(c if c.isprintable() else "?" for c in text)
    return text if len(text) <= 200 else text[:200] + "…"


def _matches(data: bytes, forms: Sequence[tuple[bytes, str]]) -> list[tuple[int, str]]:
    """(line, kind) for each secret form in ``data``: the secret and its hex in either case,
    base64 as is; the encodings also across line breaks (``base64`` wraps its output)."""
    found: list[tuple[int, str]] = []
    folded = data.lower()
    joined: bytes | None = None
    for form, kind in forms:
        exact = not kind.endswith("(base64)")
        at = folded.find(form.lower()) if exact else data.find(form)
        if at >= 0:
            found.append((data.count(b"\n", 0, at) + 1, kind))
        elif kind != "forge credential":
            if joined is None:
                joined = re.sub(rb"\s+", b"", data)
            if (form.lower() in joined.lower()) if exact else (form in joined):
                found.append((0, kind))
    return found


class _Scanner:
    """Findings of one scan: the secret forms, and detect-secrets run on files in a temp dir."""

    def __init__(self, tmp: str, forbidden: Sequence[str]) -> None:
        from detect_secrets.core.secrets_collection import SecretsCollection

        self.tmp = tmp
        self.forbidden = [s for s in forbidden if s]
        self.forms = secret_forms(self.forbidden)
        self.collection = SecretsCollection(root=tmp)
        self.count = 0
        self.findings: set[Finding] = set()

    def name(self, where: str, name: bytes) -> None:
        """A path, or an identity: only the secrets' forms are searched for."""
        for _, kind in _matches(name, self.forms):
            self.findings.add(Finding(where, 0, kind))

    def content(self, where: str, data: bytes) -> None:
        if len(data) > MAX_SCAN_BYTES:
            self.findings.add(_over_limit(where, MAX_SCAN_BYTES))
            return
        for line, kind in _matches(data, self.forms):
            self.findings.add(Finding(where, line, kind))
        self.count += 1
        local = Path(self.tmp) / str(self.count)
        local.write_bytes(data)
        self.collection.scan_file(str(local))
        for found in self.collection.data.get(str(local), set()):
            self.findings.add(Finding(where, int(found.line_number), str(found.type)))
        local.unlink()

    def result(self) -> list[Finding]:
        return sorted(self.findings, key=lambda f: (f.file, f.line, f.type))


def scan_text(text: str, forbidden: Sequence[str], *, where: str) -> list[Finding]:
    """Findings in an agent-written body (a comment, a description): the push scan's rules."""
    from detect_secrets.settings import default_settings

    with tempfile.TemporaryDirectory(prefix="forgebottle-scan-") as tmp, default_settings():
        scanner = _Scanner(tmp, forbidden)
        scanner.content(where, text.encode(errors="surrogatepass"))
        return scanner.result()


class _Objects:
    """``git cat-file --batch-command`` on the mirror: objects read one at a time, by size."""

    def __init__(self, mirror: Path) -> None:
        self.proc = subprocess.Popen(
            ["git", "-C", str(mirror), "cat-file", "--batch-command"],
            env=plain_git_env(),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.stdin, self.stdout = self.proc.stdin, self.proc.stdout

    def read(self, oid: str, limit: int) -> bytes | None:
        """The object's content, or None if it is over ``limit`` bytes."""
        self.stdin.write(f"info {oid}\n".encode())
        self.stdin.flush()
        header = self.stdout.readline().split()
        if len(header) != 3:
            raise ScanFailed("scan: cannot read an object", detail=f"cat-file gave no header for {oid}")
        if int(header[2]) > limit:
            return None
        self.stdin.write(f"contents {oid}\n".encode())
        self.stdin.flush()
        size = int(self.stdout.readline().split()[2])
        data = self.stdout.read(size + 1)[:size]
        return data

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.stdin.close()
        try:
            self.proc.wait(timeout=GIT_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.stdout.close()


def _changed(git: Callable[..., bytes], commit: str) -> list[tuple[str, bytes]]:
    """(blob id, path) of each file ``commit`` adds or changes, against each parent."""
    raw = git("diff-tree", "-r", "-z", "-m", "--root", "--no-renames", "--no-commit-id", "--diff-filter=d", commit)
    fields = raw.split(b"\0")
    out = []
    for meta, path in zip(fields[0::2], fields[1::2], strict=False):
        parts = meta.split()
        if len(parts) >= 4 and parts[1] != b"160000":  # a submodule's commit is not ours to read
            out.append((parts[3].decode(), path))
    return out


def scan_change(mirror: Path, base: str, sha: str, forbidden: Sequence[str]) -> tuple[list[Finding], int]:
    """Scan every commit of ``base..sha`` as it would reach the forge: (findings, files scanned).

    Each commit's object (author, committer, message) and every file it adds or changes, at
    every path, intermediate commits included. detect-secrets finds the usual suspects; any of
    ``forbidden`` (the forge token, the webhook secret), or its base64 or hex, is a finding.
    What the scan cannot read whole (over MAX_SCAN_BYTES, MAX_SCAN_FILES, MAX_SCAN_COMMITS) is
    a finding too, never skipped.
    """
    from detect_secrets.settings import default_settings

    def git(*args: str) -> bytes:
        try:
            return subprocess.run(
                ["git", "-C", str(mirror), *args],
                env=plain_git_env(),
                capture_output=True,
                check=True,
                timeout=GIT_TIMEOUT,
            ).stdout
        except subprocess.CalledProcessError as exc:
            raise ScanFailed(f"scan: git {args[0]} failed", detail=exc.stderr.decode(errors="replace")) from None

    commits = git("rev-list", "--reverse", sha, *([f"^{base}"] if base else [])).decode().split()
    if len(commits) > MAX_SCAN_COMMITS:
        return [_over_limit("(change)", MAX_SCAN_COMMITS, "commits")], 0
    objects = _Objects(mirror)
    scanned: set[str] = set()
    try:
        with tempfile.TemporaryDirectory(prefix="forgebottle-scan-") as tmp, default_settings():
            scanner = _Scanner(tmp, forbidden)
            for commit in commits:
                where = f"(commit {commit[:12]})"
                body = objects.read(commit, MAX_SCAN_BYTES)
                if body is None:
                    scanner.findings.add(_over_limit(where, MAX_SCAN_BYTES))
                else:
                    scanner.content(where, body)
                for blob, path in _changed(git, commit):
                    shown = _shown(path, scanner.forbidden)
                    scanner.name(shown, path)
                    if blob in scanned:
                        continue
                    scanned.add(blob)
                    if len(scanned) > MAX_SCAN_FILES:
                        scanner.findings.add(_over_limit("(change)", MAX_SCAN_FILES, "files"))
                        return scanner.result(), MAX_SCAN_FILES
                    data = objects.read(blob, MAX_SCAN_BYTES)
                    if data is None:
                        scanner.findings.add(_over_limit(shown, MAX_SCAN_BYTES))
                    else:
                        scanner.content(shown, data)
            return scanner.result(), len(scanned)
    finally:
        objects.close()
