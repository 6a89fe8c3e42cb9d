"""CI as Gitea 1.26 shows it: commit statuses and an in-memory Actions (runs of jobs with logs),
their API JSON and the ``status``/``workflow_run``/``workflow_job`` webhooks (CONTRACT.md §7).

Nothing runs: a test or the demo says which jobs a run has and how each ends
(``run_workflow(owner, repo, sha, jobs={"test": "failure"}, log="...")``), and the forge walks
them through queued, in_progress and completed, firing what Gitea fires at each step. Like
Gitea's Actions, every job also sets a commit status on the run's commit. A Forgejo forge sends
no ``workflow_*`` webhooks (its Actions notifications are other events): only the statuses.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from .gitcmd import git_out
from .records import DevForgeError, JobRec, RepoRec, RunRec, StatusRec, now
from .render import GiteaJson
from .webhooks import Flavor, Outbox, delivery_for, subscribed

STATES = ("pending", "success", "error", "failure", "warning", "skipped")
CONCLUSIONS = ("success", "failure", "cancelled", "skipped")
# What an Actions job's result sets as its commit status (services/actions/commit_status.go).
_JOB_STATE = {"success": "success", "failure": "failure", "cancelled": "failure", "skipped": "skipped"}
_SHA = re.compile(r"[0-9a-f]{40}")
# A ref we hand to git: no option look-alikes, no revision syntax (``^``, ``~``, ``:``, ``@{``).
_REF = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/-]{0,250}")


class CiForge(GiteaJson):
    """Statuses and Actions over the world; ``DevForge`` adds the rest and sets ``outbox``."""

    outbox: Outbox
    flavor: Flavor

    def _emit(self, repo: RepoRec, event_type: str, payload: dict[str, Any]) -> None:
        for hook in repo.hooks:
            if hook.active and subscribed(hook, event_type):
                self.outbox.send(delivery_for(hook, event_type, payload, self.flavor))

    # -- commits -------------------------------------------------------------------------

    def resolve_commit(self, repo: RepoRec, ref: str) -> str:
        """The commit a sha, branch or tag names; 404 for anything else."""
        if not _REF.fullmatch(ref) or ".." in ref:
            raise DevForgeError(404, "not found")
        for candidate in (f"refs/heads/{ref}", f"refs/tags/{ref}", ref):
            sha = git_out(
                ["-C", str(repo.path), "rev-parse", "--verify", "-q", "--end-of-options", f"{candidate}^{{commit}}"],
                check=False,
            )
            if _SHA.fullmatch(sha) and (candidate != ref or sha.startswith(ref.lower())):
                return sha
        raise DevForgeError(404, "not found")

    def payload_commit(self, repo: RepoRec, sha: str) -> dict[str, Any]:
        """A ``PayloadCommit``: what a status payload and a branch carry about their commit."""
        fields = git_out(["-C", str(repo.path), "show", "-s", "--format=%an%x00%ae%x00%cn%x00%ce%x00%cI%x00%B", sha])
        an, ae, cn, ce, when, message = (fields.split("\0") + [""] * 6)[:6]
        return {
            "id": sha,
            "message": message.strip() + "\n",
            "url": f"{self.base_url}{repo.full_name}/commit/{sha}",
            "author": {"name": an, "email": ae, "username": ""},
            "committer": {"name": cn, "email": ce, "username": ""},
            "verification": None,
            "timestamp": when,
            "added": None,
            "removed": None,
            "modified": None,
        }

    # -- commit statuses -----------------------------------------------------------------

    def create_status(
        self,
        owner: str,
        name: str,
        sha: str,
        *,
        state: str,
        context: str = "default",
        description: str = "",
        target_url: str = "",
        user: str,
    ) -> StatusRec:
        """``POST /statuses/{sha}``: a new status on the commit, and the ``status`` webhook."""
        if state not in STATES:
            raise DevForgeError(400, f"invalid state: {state[:40]!r}")
        with self.lock:
            repo = self.repo(owner, name)
            commit = self.resolve_commit(repo, sha)
            stamp = now()
            rec = StatusRec(
                self._next_id(), commit, state, context, description, target_url, self.user(user).login, stamp
            )
            repo.statuses.append(rec)
            payload = {
                "commit": self.payload_commit(repo, commit),
                "context": rec.context,
                "created_at": rec.created_at,
                "description": rec.description,
                "id": rec.id,
                "repository": self.repo_json(repo, user),
                "sender": self.user_json(user),
                "sha": commit,
                "state": rec.state,
                "target_url": rec.target_url,
                "updated_at": rec.created_at,
            }
            self._emit(repo, "status", payload)
            return rec

    def statuses(self, repo: RepoRec, ref: str) -> list[StatusRec]:
        """Every status of the commit ``ref`` names, newest first (Gitea's default order)."""
        commit = self.resolve_commit(repo, ref)
        return sorted((s for s in repo.statuses if s.sha == commit), key=lambda s: -s.id)

    def status_json(self, repo: RepoRec, rec: StatusRec) -> dict[str, Any]:
        return {
            "id": rec.id,
            "status": rec.state,  # the API calls it "status"; the webhook calls it "state"
            "target_url": rec.target_url,
            "description": rec.description,
            "url": f"{self.base_url}api/v1/repos/{repo.full_name}/statuses/{rec.sha}",
            "context": rec.context,
            "creator": self.user_json(rec.creator),
            "created_at": rec.created_at,
            "updated_at": rec.created_at,
        }

    # -- Actions -------------------------------------------------------------------------

    def run_workflow(
        self,
        owner: str,
        name: str,
        head_sha: str,
        jobs: Mapping[str, str] | None = None,
        *,
        log: str | bytes | Mapping[str, str | bytes] = "",
        workflow: str = "ci.yml",
        user: str | None = None,
    ) -> RunRec:
        """A run of ``workflow`` at ``head_sha`` whose jobs (name -> conclusion) all finish."""
        run = self.start_workflow(owner, name, head_sha, jobs, log=log, workflow=workflow, user=user)
        return self.finish_workflow(owner, name, run.id)

    def start_workflow(
        self,
        owner: str,
        name: str,
        head_sha: str,
        jobs: Mapping[str, str] | None = None,
        *,
        log: str | bytes | Mapping[str, str | bytes] = "",
        workflow: str = "ci.yml",
        user: str | None = None,
    ) -> RunRec:
        """A run queued then started: its jobs in progress, their statuses pending."""
        jobs = dict(jobs or {"test": "success"})
        for conclusion in jobs.values():
            if conclusion not in CONCLUSIONS:
                raise ValueError(f"a job concludes with one of {CONCLUSIONS}, not {conclusion!r}")
        with self.lock:
            repo = self.repo(owner, name)
            sha = self.resolve_commit(repo, head_sha)
            actor = self.user(user or repo.owner).login
            pull = next(
                (
                    i
                    for i in repo.issues.values()
                    if i.pull and i.state == "open" and self.branch_sha(repo, i.pull.head) == sha
                ),
                None,
            )
            branch = pull.pull.head if pull and pull.pull else self._branch_at(repo, sha)
            stamp = now()
            run = RunRec(
                self._next_id(),
                workflow,
                f"{workflow} at {sha[:10]}",
                sha,
                branch,
                "pull_request" if pull else "push",
                actor,
                stamp,
                pull_number=pull.number if pull else None,
            )
            for index, (job_name, conclusion) in enumerate(jobs.items()):
                text = log.get(job_name, "") if isinstance(log, Mapping) else log
                data = text.encode() if isinstance(text, str) else bytes(text)
                run.jobs.append(JobRec(self._next_id(), run.id, index, job_name, conclusion, data, stamp))
            repo.runs.append(run)
            self._run_event(repo, run, "requested")
            for job in run.jobs:
                self._job_event(repo, run, job, "queued")
            run.status, run.started_at = "in_progress", now()
            self._run_event(repo, run, "in_progress")
            for job in run.jobs:
                job.status, job.started_at = "in_progress", now()
                self._job_status(repo, run, job, "pending", "Has started running")
                self._job_event(repo, run, job, "in_progress")
            return run

    def finish_workflow(self, owner: str, name: str, run_id: int) -> RunRec:
        """Each job of the run completes with its conclusion, then the run does."""
        with self.lock:
            repo = self.repo(owner, name)
            run = next((r for r in repo.runs if r.id == run_id), None)
            if run is None:
                raise DevForgeError(404, "not found")
            for job in run.jobs:
                job.status, job.conclusion, job.completed_at = "completed", job.conclusion_when_done, now()
                verb = "Successful in" if job.conclusion == "success" else "Failing after"
                self._job_status(repo, run, job, _JOB_STATE[job.conclusion], f"{verb} 1s")
                self._job_event(repo, run, job, "completed")
            ends = {j.conclusion for j in run.jobs}
            run.conclusion = next((c for c in ("failure", "cancelled") if c in ends), "success")
            run.status, run.completed_at = "completed", now()
            self._run_event(repo, run, "completed")
            return run

    def _branch_at(self, repo: RepoRec, sha: str) -> str:
        heads = git_out(
            ["-C", str(repo.path), "for-each-ref", "--points-at", sha, "--format=%(refname:lstrip=2)", "refs/heads"]
        )
        names = heads.split()
        return repo.default_branch if repo.default_branch in names or not names else names[0]

    def job_rec(self, repo: RepoRec, job_id: int) -> tuple[RunRec, JobRec]:
        for run in repo.runs:
            for job in run.jobs:
                if job.id == job_id:
                    return run, job
        raise DevForgeError(404, "not found")

    def _job_status(self, repo: RepoRec, run: RunRec, job: JobRec, state: str, description: str) -> None:
        context = f"{run.workflow.rsplit('.', 1)[0]} / {job.name} ({run.event})"
        self.create_status(
            repo.owner,
            repo.name,
            run.head_sha,
            state=state,
            context=context,
            description=description,
            target_url=self._job_html(repo, run, job),
            user=run.actor,
        )

    def _ci_payload(self, repo: RepoRec, run: RunRec, entity: dict[str, Any], action: str) -> dict[str, Any]:
        """WorkflowRunPayload / WorkflowJobPayload: pull_request and organization omitted when none."""
        payload: dict[str, Any] = {"action": action, **entity}
        if run.pull_number is not None:
            payload["pull_request"] = self.pr_json(repo, repo.issues[run.pull_number])
        org = self.orgs.get(repo.owner.lower())
        if org is not None:
            payload["organization"] = self.org_json(org)
        payload["repository"] = self.repo_json(repo, run.actor)
        payload["sender"] = self.user_json(run.actor)
        return payload

    def _run_event(self, repo: RepoRec, run: RunRec, action: str) -> None:
        if self.flavor == "gitea":
            entity = {"workflow": self.workflow_json(repo, run), "workflow_run": self.run_json(repo, run)}
            self._emit(repo, "workflow_run", self._ci_payload(repo, run, entity, action))

    def _job_event(self, repo: RepoRec, run: RunRec, job: JobRec, action: str) -> None:
        if self.flavor == "gitea":
            entity = {"workflow_job": self.job_json(repo, run, job)}
            self._emit(repo, "workflow_job", self._ci_payload(repo, run, entity, action))

    def _run_html(self, repo: RepoRec, run: RunRec) -> str:
        return f"{self.base_url}{repo.full_name}/actions/runs/{run.id}"

    def _job_html(self, repo: RepoRec, run: RunRec, job: JobRec) -> str:
        return f"{self._run_html(repo, run)}/jobs/{job.index}"

    def workflow_json(self, repo: RepoRec, run: RunRec) -> dict[str, Any]:
        path = f".gitea/workflows/{run.workflow}"
        return {
            "id": run.workflow,
            "name": run.workflow,
            "path": path,
            "state": "active",
            "created_at": run.created_at,
            "updated_at": run.created_at,
            "url": f"{self.base_url}api/v1/repos/{repo.full_name}/actions/workflows/{run.workflow}",
            "html_url": f"{self.base_url}{repo.full_name}/src/branch/{repo.default_branch}/{path}",
            "badge_url": f"{self.base_url}{repo.full_name}/actions/workflows/{run.workflow}/badge.svg",
            "deleted_at": None,
        }

    def run_json(self, repo: RepoRec, run: RunRec) -> dict[str, Any]:
        return {
            "id": run.id,
            "url": f"{self.base_url}api/v1/repos/{repo.full_name}/actions/runs/{run.id}",
            "html_url": self._run_html(repo, run),
            "display_title": run.title,
            "path": f"{run.workflow}@refs/heads/{run.head_branch}",
            "event": run.event,
            "run_attempt": 1,
            "run_number": repo.runs.index(run) + 1,
            "repository_id": repo.id,
            "head_sha": run.head_sha,
            "head_branch": run.head_branch,
            "status": run.status,
            "actor": self.user_json(run.actor),
            "trigger_actor": self.user_json(run.actor),
            "repository": self.repo_json(repo),
            "head_repository": self.repo_json(repo),
            "conclusion": run.conclusion,
            "started_at": run.started_at or None,
            "completed_at": run.completed_at or None,
        }

    def job_json(self, repo: RepoRec, run: RunRec, job: JobRec) -> dict[str, Any]:
        step = {"status": job.status, "conclusion": job.conclusion}
        times = {"started_at": job.started_at or None, "completed_at": job.completed_at or None}
        steps = [
            {"name": step_name, "number": n, **step, **times}
            for n, step_name in enumerate(("Set up job", job.name, "Complete job"), start=1)
        ]
        return {
            "id": job.id,
            "url": f"{self.base_url}api/v1/repos/{repo.full_name}/actions/jobs/{job.id}",
            "html_url": self._job_html(repo, run, job),
            "run_id": run.id,
            "run_url": f"{self.base_url}api/v1/repos/{repo.full_name}/actions/runs/{run.id}",
            "name": job.name,
            "labels": ["ubuntu-latest"],
            "run_attempt": 1,
            "head_sha": run.head_sha,
            "head_branch": run.head_branch,
            "status": job.status,
            "conclusion": job.conclusion,
            "runner_id": 1 if job.status != "queued" else 0,
            "runner_name": "devforge-runner" if job.status != "queued" else "",
            "steps": steps,
            "created_at": job.created_at,
            "started_at": job.started_at or None,
            "completed_at": job.completed_at or None,
        }


def scripted_ci(
    forge: CiForge,
    conclusions: Sequence[str],
    *,
    job: str = "test",
    logs: Mapping[str, str] | None = None,
) -> Callable[[str, str, str, str, str], None]:
    """An ``on_push`` callback: each push to a branch other than the default runs one workflow
    whose ``job`` ends with the next of ``conclusions`` (the last one repeats), its log
    ``logs[conclusion]``. The demo's "fails on the first push, passes on the second"."""
    if not conclusions or any(c not in CONCLUSIONS for c in conclusions):
        raise ValueError(f"conclusions are some of {CONCLUSIONS}")
    pushes = 0
    lock = threading.Lock()

    def on_push(owner: str, name: str, branch: str, sha: str, pusher: str) -> None:
        nonlocal pushes
        with forge.lock:
            if branch == forge.repo(owner, name).default_branch:
                return
        with lock:
            conclusion = conclusions[min(pushes, len(conclusions) - 1)]
            pushes += 1
        log = (logs or {}).get(conclusion, f"{job}: {conclusion}\n")
        forge.run_workflow(owner, name, sha, {job: conclusion}, log=log, user=pusher)

    return on_push
