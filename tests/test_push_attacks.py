"""The push path attacked as an agent would (issue 15, findings 1, 2, 9 and the destroy half of 11).

Each test runs a hostile agent in a real bwrap bottle against the real service and devforge, and
prints one FIGURES line (shown even under -q) with the counts that must be zero.

Findings 1 and 2 start from a file that is not a bundle where the bundle sandbox leaves its
bundle. The write itself is played by the test (``Gate``): what is under test is what the host
does with what the sandbox leaves, and the agent does the rest from inside its bottle.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from bottles import git_env
from statemachine import BottleState
from tests.conftest import Rig, needs_bwrap, read_when, wait_until

pytestmark = needs_bwrap

# The agent's own JSON-RPC call, so the test sees the sidecar's whole answer, not the tool's line.
RPC = r"""rpc() {
python3 - "$1" <<'PY'
import json, socket, sys
body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": sys.argv[1], "params": {}}).encode()
with socket.socket(socket.AF_UNIX) as s:
    s.connect("/run/forge/forge.sock")
    s.sendall(b"POST /rpc HTTP/1.1\r\nHost: f\r\nContent-Type: application/json\r\nConnection: close\r\n"
              + b"Content-Length: %d\r\n\r\n" % len(body) + body)
    data = b""
    while chunk := s.recv(65536):
        data += chunk
print(data.partition(b"\r\n\r\n")[2].decode())
PY
}
"""

# Where the issue's attacker ended: a repository in $HOME whose HEAD leads, through a symlinked
# ref, to a file of the host (the token; finding 1) or to another bottle's branch, with that
# bottle's objects borrowed through alternates (finding 2). Then the bundle sandbox is held at
# a FIFO the agent names in its git config until the gitfile pointing there is in place.
GITFILE_AGENT = (
    "#!/bin/sh\n"
    + RPC
    + r"""
set -u
while [ ! -f "$HOME/target" ]; do sleep 0.05; done
. "$HOME/target"
git init -q --bare "$HOME/evil"
ln -s "$REF_TARGET" "$HOME/evil/refs/heads/main"
echo 'ref: refs/heads/main' > "$HOME/evil/HEAD"
[ -n "${ALTERNATE:-}" ] && echo "$ALTERNATE" > "$HOME/evil/objects/info/alternates"
echo "attacker" > attacker.txt
git add attacker.txt
git commit -q -m attacker
# HEAD "already on origin": the sandbox's git bundle makes no bundle of its own.
git update-ref refs/remotes/origin/evil HEAD
mkfifo /workspace/.gate
git config include.path /workspace/.gate
rpc push > "$HOME/answer.json"
forge done failure "attacked"
"""
)

# The victim of finding 2: a commit it has not pushed, then it waits.
VICTIM_AGENT = r"""#!/bin/sh
echo "not for other bottles" > private.txt
git add private.txt
git commit -q -m "unpushed work"
git rev-parse HEAD > "$HOME/unpushed"
while [ ! -f "$HOME/go" ]; do sleep 0.05; done
forge done success "kept to itself"
"""


class Gate:
    """Plays the write the attack needs, then opens the agent's FIFO for the bundle sandbox.

    Once ``outbox`` exists the sandbox has started and waits at the FIFO: the gitfile goes in
    first, then every reader of the FIFO gets an empty config, so git goes on.
    """

    def __init__(self, outbox: Path, fifo: Path, gitfile: str) -> None:
        self.outbox, self.fifo, self.gitfile = outbox, fifo, gitfile
        self.stopped = threading.Event()
        self.planted = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self) -> None:
        wait_until(self.outbox.is_dir, timeout=60, what="the bundle sandbox's outbox")
        (self.outbox / "push.bundle").write_text(self.gitfile)
        self.planted.set()
        while not self.stopped.is_set():
            try:
                os.close(os.open(self.fifo, os.O_WRONLY))  # blocks until git opens it to read
            except OSError:
                return

    def stop(self) -> None:
        self.stopped.set()
        with contextlib.suppress(OSError):
            os.close(os.open(self.fifo, os.O_RDONLY | os.O_NONBLOCK))  # frees a writer waiting in open
        self.thread.join(timeout=10)


@pytest.fixture
def gates() -> Iterator[Callable[..., Gate]]:
    made: list[Gate] = []

    def make(outbox: Path, fifo: Path, gitfile: str) -> Gate:
        gate = Gate(outbox, fifo, gitfile)
        made.append(gate)
        gate.thread.start()
        return gate

    yield make
    for gate in made:
        gate.stop()


GIT_WORDS = ("fatal", "error:", "upload-pack", "not our ref", "remote error", "gitdir", "bundle.git")


def leaks(text: str, secrets: list[str], host_paths: list[str]) -> list[str]:
    """What of a secret, git's stderr or a host path ``text`` holds."""
    found = [f"secret {s[:4]}…" for s in secrets if s in text]
    found += [f"git text {w!r}" for w in GIT_WORDS if w in text.lower()]
    found += [f"host path {p}" for p in host_paths if p in text]
    return found


def attack(rig: Rig, gates: Callable[..., Gate], issue: int, target: dict[str, str]) -> tuple[str, dict[str, Any]]:
    """Let the gitfile agent of ``issue`` attack with ``target``; its slug and JSON-RPC answer."""
    state = rig.wait_state(issue, BottleState.RUNNING)
    bottle = rig.state_dir / "bottles" / state.slug
    gate = gates(bottle / "outbox", bottle / "workspace" / ".gate", "gitdir: ../home/evil\n")
    (rig.home(state.slug) / "target").write_text("".join(f"{k}='{v}'\n" for k, v in target.items()))
    rig.wait_state(issue, BottleState.FROZEN, runs=1)
    assert gate.planted.is_set()  # the hostile file really was where the bundle goes
    answer: dict[str, Any] = json.loads(read_when(rig.home(state.slug) / "answer.json"))
    return state.slug, answer


def mirror_has(rig: Rig, slug: str, sha: str) -> bool:
    mirror = rig.state_dir / "bottles" / slug / "mirror.git"
    check = ["git", "-C", str(mirror), "cat-file", "-e", f"{sha}^{{commit}}"]
    return subprocess.run(check, env=git_env(), capture_output=True).returncode == 0


def test_a_gitfile_for_a_bundle_never_shows_the_token(
    rig_factory: Callable[..., Rig], short_tmp: Path, gates: Callable[..., Gate], figures: Callable[..., None]
) -> None:
    rig = rig_factory(scripts={"gitfile": GITFILE_AGENT}).start()
    token = rig.forge.world.bot.token
    token_file = short_tmp / "forge-token"
    token_file.write_text(token)  # as a deployment keeps it
    issue = rig.open_issue(agent="gitfile")
    slug, answer = attack(rig, gates, issue.number, {"REF_TARGET": str(token_file)})
    bottle = rig.state_dir / "bottles" / slug
    secrets = [token, rig.config.webhook_secret.reveal() if rig.config.webhook_secret else token]
    host_paths = [str(rig.state_dir), str(short_tmp)]
    seen_by_agent = json.dumps(answer) + (bottle / "run-1.log").read_text()
    found = leaks(seen_by_agent, secrets, host_paths)
    logged = [o.detail for o in rig.store.operations(slug) if token in o.detail]
    branch = rig.forge.dev.branch_sha(
        rig.forge.dev.repo(rig.forge.owner, rig.forge.repo), f"bot-bottle/issue-{issue.number}"
    )
    figures(
        "gitfile-bundle",
        refused=int("error" in answer),
        leaks=len(found),
        token_in_log=len(logged),
        pushed=int(bool(branch)),
    )
    assert answer["error"]["code"] == -32002, answer
    assert found == [] and logged == []
    assert branch == ""


def test_another_bottles_unpushed_work_never_moves(
    rig_factory: Callable[..., Rig], gates: Callable[..., Gate], figures: Callable[..., None]
) -> None:
    rig = rig_factory(scripts={"gitfile": GITFILE_AGENT, "victim": VICTIM_AGENT}).start()
    dev, owner, repo = rig.forge.dev, rig.forge.owner, rig.forge.repo
    victim = rig.open_issue(agent="victim")
    victim_state = rig.wait_state(victim.number, BottleState.RUNNING)
    unpushed = read_when(rig.home(victim_state.slug) / "unpushed").strip()
    victim_git = rig.state_dir / "bottles" / victim_state.slug / "workspace" / ".git"
    attacker = rig.open_issue(agent="gitfile")
    slug, answer = attack(
        rig,
        gates,
        attacker.number,
        {
            "REF_TARGET": str(victim_git / "refs" / "heads" / f"bot-bottle/issue-{victim.number}"),
            "ALTERNATE": str(victim_git / "objects"),
        },
    )
    rig.home(victim_state.slug).joinpath("go").touch()
    in_mirror = mirror_has(rig, slug, unpushed)
    forge_repo = dev.repo(owner, repo)
    check = ["git", "-C", str(forge_repo.path), "cat-file", "-e", f"{unpushed}^{{commit}}"]
    on_forge = subprocess.run(check, env=git_env(), capture_output=True).returncode == 0
    branches = [dev.branch_sha(forge_repo, f"bot-bottle/issue-{n}") for n in (victim.number, attacker.number)]
    found = leaks(json.dumps(answer), [rig.forge.world.bot.token], [str(rig.state_dir)])
    figures(
        "cross-bottle",
        refused=int("error" in answer),
        in_attacker_mirror=int(in_mirror),
        on_forge=int(on_forge),
        leaks=len(found),
    )
    assert answer["error"]["code"] == -32002, answer
    assert not in_mirror and not on_forge and found == []
    assert branches == ["", ""]


# Five ways around the old scan, each pushed from the same start: a key committed and removed
# again, a key as a file name, in the author, in the committer (with the message carrying it
# base64-encoded), and after 2 MiB of padding.
EVASIVE_AGENT = (
    "#!/bin/sh\n"
    + RPC
    + r"""
set -u
base=$(git rev-parse HEAD)
try() {
  git reset -q --hard "$base"
  "$@"
  printf '%s ' "$1" >> "$HOME/answers.txt"
  rpc push | tr -d '\n' >> "$HOME/answers.txt"
  echo >> "$HOME/answers.txt"
}
intermediate() {
  echo "$LEAKED" > notes.txt && git add notes.txt && git commit -q -m "notes"
  git rm -q notes.txt && git commit -q -m "tidy"
}
file_name() {
  echo hello > "$LEAKED.txt" && git add . && git commit -q -m "a file"
}
author() {
  echo a > a.txt && git add a.txt && GIT_AUTHOR_NAME="$LEAKED" git commit -q -m "by someone"
}
committer() {
  echo c > c.txt && git add c.txt
  GIT_COMMITTER_EMAIL="$LEAKED@example.com" git commit -q -m "note $(printf %s "$LEAKED" | base64)"
}
padding() {
  head -c $((2 * 1024 * 1024 + 10)) /dev/zero | tr '\0' a > big.txt
  printf '\n%s\n' "$LEAKED" >> big.txt
  git add big.txt && git commit -q -m "data"
}
for evasion in intermediate file_name author committer padding; do try "$evasion"; done
forge done failure "evaded"
"""
)


def test_the_scan_is_not_evaded(rig_factory: Callable[..., Rig], figures: Callable[..., None]) -> None:
    rig = rig_factory(scripts={"evasive": EVASIVE_AGENT})
    token = rig.forge.world.bot.token
    rig.agent_env = {"LEAKED": token}  # as if it had leaked: the agent knows the token
    rig.start()
    issue, state = rig.run_once(agent="evasive")
    answers = {}
    for line in read_when(rig.home(state.slug) / "answers.txt").splitlines():
        name, _, answer = line.partition(" ")
        answers[name] = json.loads(answer)
    refused = {name for name, answer in answers.items() if answer.get("error", {}).get("code") == -32005}
    echoed = [name for name, answer in answers.items() if token in json.dumps(answer)]
    dev = rig.forge.dev
    branch = dev.branch_sha(dev.repo(rig.forge.owner, rig.forge.repo), f"bot-bottle/issue-{issue.number}")
    figures("scan-evasions", tried=len(answers), refused=len(refused), echoed=len(echoed), pushed=int(bool(branch)))
    assert set(answers) == {"intermediate", "file_name", "author", "committer", "padding"}
    assert refused == set(answers), answers
    assert "over the scan limit" in answers["padding"]["error"]["message"]
    assert echoed == [] and branch == ""


# What the agent leaves in its home, including a directory it made unreadable.
LOCKING_AGENT = r"""#!/bin/sh
mkdir -p "$HOME/cache/locked/deeper"
echo kept > "$HOME/cache/locked/deeper/file"
chmod 000 "$HOME/cache/locked"
exec /bin/sh /opt/forgebottle/bin/happy-agent
"""


def test_destroy_removes_home_and_keeps_the_record(
    rig_factory: Callable[..., Rig], figures: Callable[..., None]
) -> None:
    rig = rig_factory(scripts={"locking": LOCKING_AGENT}).start()
    issue, state = rig.run_once(agent="locking")
    bottle = rig.state_dir / "bottles" / state.slug
    assert (bottle / "home" / "cache" / "locked").exists() and state.pr_number
    rig.forge.dev.merge_pr(rig.forge.owner, rig.forge.repo, state.pr_number, user=rig.forge.world.member.login)
    gone = rig.wait_state(issue.number, BottleState.DESTROYED)
    left = sorted(p.name for p in bottle.iterdir())
    figures(
        "destroy",
        home=int(os.path.lexists(bottle / "home")),
        workspace=int((bottle / "workspace").exists()),
        kept=len(left),
    )
    assert not os.path.lexists(bottle / "home") and not (bottle / "workspace").exists()
    assert gone.slug == state.slug and rig.store.runs(state.slug)
    assert left == ["prompt-1.md", "run-1.log"]
