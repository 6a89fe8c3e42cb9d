"""The CI loop (DESIGN.md §4, §12) and ``refresh``, end to end: the devforge runs scripted CI on
each push and sends Gitea's ``status``/``workflow_job``/``workflow_run`` webhooks (Forgejo's:
statuses only); the bottle is woken with the failure, and what it does next is read back."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import devforge as df
from statemachine import BottleState
from tests.conftest import WEBHOOK_SECRET, Forge, Rig, needs_bwrap, read_when, serve_forge, wait_until
from tests.test_conversation import assert_nothing_of_the_record, status_comments, the_status
from tests.test_sidecar import AWS_KEY, Sidecar, running

__all__ = ["running"]  # the fixture, from test_sidecar

HOOK_EVENTS = (
    "issues",
    "issue_comment",
    "pull_request",
    "pull_request_comment",
    "pull_request_review",
    "status",
    "workflow_job",
    "workflow_run",
)

# First run: a change, a push, a PR. Woken by CI: reads the checks and the log, reports
# progress, pushes a fix. Woken otherwise: refreshes, merges what was pushed to its branch,
# pushes again.
CI_AGENT = r"""#!/bin/sh
set -eu
issue="$FORGE_ISSUE_NUMBER"
n=$(ls "$HOME" | grep -c '^prompt-' || true)
n=$((n + 1))
cp "$FORGE_PROMPT_FILE" "$HOME/.prompt" && mv "$HOME/.prompt" "$HOME/prompt-$n.md"
if grep -q "### CI failed" "$FORGE_PROMPT_FILE"; then
  forge checks > "$HOME/checks-$n.json"
  job=$(python3 -c 'import json,sys
print([c["job_id"] for c in json.load(open(sys.argv[1])) if c["state"] == "failure" and "job_id" in c][0])
' "$HOME/checks-$n.json")
  forge job-log "$job" --tail 3 > "$HOME/joblog-$n.json"
  forge progress "- [x] read the failing check
- [x] wrote a fix" > /dev/null
  echo "fixed in run $n" > fix.txt
  git add fix.txt
  git commit -q -m "Fix CI"
  forge push > /dev/null
  forge done success "fixed the failing test"
  exit 0
fi
if [ "$n" -gt 1 ]; then
  forge refresh > "$HOME/refresh-$n.json"
  git merge -q --no-edit "origin/bot-bottle/issue-$issue"
  echo "run $n" >> change.txt
  git commit -q -am "More for review"
  forge push > "$HOME/push-$n.json"
  forge done success "merged and pushed"
  exit 0
fi
echo "change for $issue" > change.txt
git add change.txt
git commit -q -m "change for #$issue"
forge push > /dev/null
forge open-pr --title "Fix #$issue" --body "A change." > /dev/null
forge done success "opened a PR"
"""


@pytest.fixture(params=["gitea", "forgejo"])
def forge(short_tmp: Path, request: pytest.FixtureRequest) -> Iterator[Forge]:
    yield from serve_forge(short_tmp / "forge", request.param)


def failing_log(token: str) -> str:
    """A hostile job log: colours, controls, a code fence, a leaked secret, many lines."""
    noise = "".join(f"line {i}\n" for i in range(300))
    return (
        noise + "\x1b[31mFAILED\x1b[0m tests/test_x.py::test_sum - assert 1 == 2\x07\n"
        "```\nnot a fence end\n"
        f"token={token}\n"
        "Error: Process completed with exit code 1.\n"
    )


def ci_rig(rig_factory: Callable[..., Rig], conclusions: list[str], **overrides: object) -> Rig:
    rig = rig_factory(scripts={"ci": CI_AGENT}, status_edit_interval=0.3, **overrides).start(hook=False)
    dev = rig.forge.dev
    rig.hook = dev.add_hook(rig.forge.owner, rig.forge.repo, f"{rig.url}/webhook", WEBHOOK_SECRET, events=HOOK_EVENTS)
    logs = {"failure": failing_log(rig.forge.world.bot.token), "success": "all green\n"}
    dev.on_push = df.scripted_ci(dev, conclusions, logs=logs)
    return rig


def head(rig: Rig, pr: int) -> str:
    return str(
        rig.forge.dev.pr_json(
            rig.forge.dev.repo(rig.forge.owner, rig.forge.repo),
            rig.forge.dev.issue(rig.forge.owner, rig.forge.repo, pr),
        )["head"]["sha"]
    )


def test_a_failing_check_wakes_the_frozen_bottle_with_its_log_and_a_fix_is_noted(
    rig_factory: Callable[..., Rig],
) -> None:
    rig = ci_rig(rig_factory, ["failure", "success"])
    owner, repo, token = rig.forge.owner, rig.forge.repo, rig.forge.world.bot.token
    issue = rig.open_issue("ci")
    # The failure came while the first run was still going: one pending prompt, one more run.
    state = rig.wait_state(issue.number, BottleState.FROZEN, runs=2, timeout=90)
    rig.wait_events_done()
    assert len(rig.store.runs(state.slug)) == 2
    assert rig.store.runs(state.slug)[1]["trigger"] == "ci"
    prompt = (rig.home(state.slug) / "prompt-2.md").read_text()
    assert "### CI failed on your branch bot-bottle/issue-1" in prompt or "### CI failed on your pull request" in prompt
    assert "The check `" in prompt and "test" in prompt
    assert f"{rig.forge.server.url}/{owner}/{repo}/actions/runs/" in prompt
    assert "FAILED tests/test_x.py::test_sum - assert 1 == 2" in prompt
    assert "Error: Process completed with exit code 1." in prompt
    assert "line 0\n" not in prompt  # only the tail
    assert "\x1b" not in prompt and "\x07" not in prompt
    assert token not in prompt and "token=***" in prompt
    assert "````" in prompt  # the fence is longer than any run of backticks in the log
    assert "fix attempt 1 of 3" in prompt

    checks = json.loads((rig.home(state.slug) / "checks-2.json").read_text())
    failed = [c for c in checks if c["state"] == "failure"]
    assert failed and failed[0]["job_id"] and failed[0]["target_url"].startswith(rig.forge.server.url)
    log = json.loads((rig.home(state.slug) / "joblog-2.json").read_text())
    assert log["conclusion"] == "failure" and log["name"] == "test"
    assert log["lines"] == ["not a fence end", "token=***", "Error: Process completed with exit code 1."]

    body = the_status(rig, issue.number, says="fixed the failing test")
    assert "**CI:** passing on `" in body and "after 1 fix attempt." in body and "- [x] wrote a fix" in body
    assert_nothing_of_the_record(body.replace(head(rig, state.pr_number or 0)[:12], ""), rig)

    # A failure on the old commit is ignored with its reason, and wakes nothing.
    first = rig.store.noted_keys(owner, repo, issue.number, "ci-fix")[0]
    rig.forge.dev.run_workflow(owner, repo, first, {"test": "failure"}, log="late\n")
    rig.wait_events_done()
    assert any(f"CI on {first[:12]} is for an old commit" in r for r in rig.event_reasons())
    assert rig.wait_state(issue.number, BottleState.FROZEN).status is BottleState.FROZEN
    assert len(rig.store.runs(state.slug)) == 2
    assert len(status_comments(rig, issue.number)) == 1


def test_no_fix_past_max_fix_attempts(rig_factory: Callable[..., Rig]) -> None:
    rig = ci_rig(rig_factory, ["failure", "failure"], ci_max_fix_attempts=1)
    owner, repo = rig.forge.owner, rig.forge.repo
    issue = rig.open_issue("ci")
    state = rig.wait_state(issue.number, BottleState.FROZEN, runs=2, timeout=90)
    rig.wait_events_done()
    # The fix failed too (on the new head): the one attempt is spent, the bottle stays frozen.
    assert any("has had its 1 fix attempt(s)" in r for r in rig.event_reasons())
    assert len(rig.store.runs(state.slug)) == 2
    assert rig.store.pending(state.slug) == []
    assert len(rig.store.noted_keys(owner, repo, issue.number, "ci-fix")) == 1
    body = the_status(rig, issue.number, says="are used up")
    assert "failed on `" in body and "; the 1 fix attempt(s) are used up: over to a human." in body


def test_the_ci_loop_can_be_turned_off(rig_factory: Callable[..., Rig]) -> None:
    rig = ci_rig(rig_factory, ["failure"], ci_max_fix_attempts=0)
    _, state = rig.run_once("ci")
    rig.wait_events_done()
    assert any("the CI loop is off" in r for r in rig.event_reasons())
    assert len(rig.store.runs(state.slug)) == 1 and rig.store.pending(state.slug) == []


def test_after_a_human_push_to_the_bot_branch_refresh_then_push_succeeds(rig_factory: Callable[..., Rig]) -> None:
    rig = ci_rig(rig_factory, ["success"])
    dev, world, owner, repo = rig.forge.dev, rig.forge.world, rig.forge.owner, rig.forge.repo
    issue, state = rig.run_once("ci")
    assert state.pr_number is not None
    human = dev.commit_files(owner, repo, "bot-bottle/issue-1", {"HUMAN.md": "a human's fix\n"}, "A human helps")
    dev.review(owner, repo, state.pr_number, "Please extend change.txt", user=world.member.login, kind="comment")
    rig.wait_state(issue.number, BottleState.FROZEN, runs=2)
    prompt = (rig.home(state.slug) / "prompt-2.md").read_text()
    assert "bot-bottle/issue-1 moved on the forge since your last push" in prompt
    assert f"-> {human[:12]})" in prompt and "forge refresh" in prompt
    refreshed = json.loads(read_when(rig.home(state.slug) / "refresh-2.json"))
    base = dev.branch_sha(dev.repo(owner, repo), "main")
    assert refreshed == {"branch_sha": human, "base_sha": base}
    pushed = json.loads(read_when(rig.home(state.slug) / "push-2.json"))
    assert dev.branch_sha(dev.repo(owner, repo), "bot-bottle/issue-1") == pushed["sha"]
    ops = [op for op in rig.store.operations(state.slug) if op.op == "refresh"]
    assert [(op.outcome, op.detail) for op in ops] == [
        ("ok", "refreshed bot-bottle/issue-1 and its base from the forge")
    ]
    wait_until(lambda: rig.store.runs(state.slug)[-1]["signalled_status"] == "success", what="run 2 done")


# -- the new sidecar methods, attacked as an agent would ------------------------------------


def test_progress_checks_and_logs_refuse_what_an_agent_should_not_get(running: Callable[..., Sidecar]) -> None:
    sc = running(status_edit_interval=0.3)
    dev, owner, repo = sc.rig.forge.dev, sc.rig.forge.owner, sc.rig.forge.repo
    issue = sc.state.issue_number
    # A secret in the progress text is refused like one in a comment: nothing reaches the forge.
    assert sc.code("update_progress", body=f"- [x] found {AWS_KEY}") == -32005
    assert sc.code("update_progress", body="x" * (16 * 1024 + 1)) == -32602
    url = sc.ok("update_progress", body="- [ ] a step")["html_url"]
    body = the_status(sc.rig, issue, says="- [ ] a step")
    assert "AKIA" not in body and url.endswith(str(status_comments(sc.rig, issue)[0].id))

    # A job of another repository is not this bottle's to read, whatever its id.
    dev.create_repo(owner, "private", {"README.md": "x\n"})
    elsewhere = dev.run_workflow(owner, "private", "main", {"build": "failure"}, log="private words\n")
    answer = sc.call("read_job_log", job_id=elsewhere.jobs[0].id)
    assert answer["error"] == {"code": -32002, "message": "not found on the forge"}
    # A huge log is read as a bounded tail, however many lines are asked for.
    main = dev.branch_sha(dev.repo(owner, repo), "main")
    mine = dev.run_workflow(owner, repo, main, {"test": "failure"}, log="".join(f"l{i}\n" for i in range(100_000)))
    log = sc.ok("read_job_log", job_id=mine.jobs[0].id, tail_lines=2**31 - 1)
    assert len(log["lines"]) == 1000 and log["lines"][-1] == "l99999"
    # A ref that tries to climb out of the repository's routes names nothing.
    for ref in ("../../../user", "main/../../x", "%2e%2e"):
        assert sc.call("read_checks", ref=ref)["error"]["message"] == "not found on the forge", ref
    checks = sc.ok("read_checks", ref=main)
    assert [(c["state"], c["job_id"]) for c in checks] == [("failure", mine.jobs[0].id)]
    ops = [(op, outcome) for op, outcome, _ in sc.ops() if op in ("update_progress", "read_job_log", "read_checks")]
    assert ops[:3] == [("update_progress", "denied"), ("update_progress", "error"), ("update_progress", "ok")]


@needs_bwrap
def test_refresh_cannot_write_the_mirror_through_hooks_or_a_symlinked_git_dir(
    running: Callable[..., Sidecar],
) -> None:
    sc = running()
    sc.commit({"a.txt": "a\n"})
    assert sc.ok("push")["branch"] == "bot-bottle/issue-1"
    mirror = sc.rig.state_dir / "bottles" / sc.state.slug / "mirror.git"
    before = sorted(str(p.relative_to(mirror)) for p in mirror.rglob("*"))
    # A hook the agent planted runs inside the sandbox, where the mirror is read-only.
    hook = sc.workspace / ".git" / "hooks" / "reference-transaction"
    hook.write_text("#!/bin/sh\ntouch /run/mirror/pwned 2>/dev/null\nls /run > /workspace/hook-saw\nexit 0\n")
    hook.chmod(0o755)
    main = sc.rig.forge.dev.branch_sha(sc.rig.forge.dev.repo(sc.rig.forge.owner, sc.rig.forge.repo), "main")
    pushed = sc.rig.forge.dev.branch_sha(
        sc.rig.forge.dev.repo(sc.rig.forge.owner, sc.rig.forge.repo), "bot-bottle/issue-1"
    )
    assert sc.ok("refresh") == {"branch_sha": pushed, "base_sha": main}
    assert "mirror" in (sc.workspace / "hook-saw").read_text().split()
    # The workspace's git dir made a link to the mirror: the fetch fails, the mirror is as it was.
    hook.unlink()
    real = sc.workspace / ".git-real"
    (sc.workspace / ".git").rename(real)
    (sc.workspace / ".git").symlink_to("/run/mirror")
    answer = sc.call("refresh")
    assert answer["error"]["message"] == "the workspace could not fetch from forgebottle's mirror"
    (sc.workspace / ".git").unlink()
    real.rename(sc.workspace / ".git")
    assert not (mirror / "pwned").exists()
    assert sorted(str(p.relative_to(mirror)) for p in mirror.rglob("*")) == before
