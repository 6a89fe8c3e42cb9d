"""devforge against Gitea's own API spec (../shared/gitea/swagger.v1.json, read in place).

Every API route devforge serves must exist in the spec with that method, and every response
body it sends (and every entity inside its webhook payloads) must validate against the spec's
definitions. Go marshals nil slices and pointers as null, which Swagger 2.0 cannot say, so
null is allowed for every property.
"""

from __future__ import annotations

import ast
import copy
import hashlib
import hmac
import json
import re
import sys
from functools import cache
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import pytest
from starlette.routing import Route

import devforge as df
from tests.conftest import ROOT, Forge

SPEC_PATH = Path(__file__).resolve().parents[2] / "shared" / "gitea" / "swagger.v1.json"
pytestmark = pytest.mark.skipif(not SPEC_PATH.exists(), reason="../shared/gitea/swagger.v1.json is not beside the repo")


@cache
def spec() -> dict[str, Any]:
    return json.loads(SPEC_PATH.read_text())  # type: ignore[no-any-return]


def nullable(schema: Any) -> Any:
    if isinstance(schema, list):
        return [nullable(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: nullable(v) for k, v in schema.items()}
    if isinstance(out.get("type"), str):
        out["type"] = [out["type"], "null"]
    if "properties" in out:
        out["properties"] = {
            name: ({"anyOf": [prop, {"type": "null"}]} if "$ref" in prop else prop)
            for name, prop in out["properties"].items()
        }
    return out


@cache
def definitions() -> dict[str, Any]:
    return nullable(copy.deepcopy(spec()["definitions"]))  # type: ignore[no-any-return]


def validate(schema: dict[str, Any], instance: Any) -> None:
    jsonschema.Draft4Validator({**schema, "definitions": definitions()}).validate(instance)


def response_schema(path: str, method: str, status: int) -> dict[str, Any] | None:
    responses = spec()["paths"][path][method.lower()]["responses"]
    if str(status) not in responses and status >= 400:
        # Gitea's handlers answer some errors the spec leaves out (422 for a bad hook type):
        # only the error body's shape is checked then.
        return None
    response = responses[str(status)]
    if "$ref" in response:
        response = spec()["responses"][response["$ref"].split("/")[-1]]
    schema = response.get("schema")
    return nullable(schema) if schema else None


Call = tuple[str, str, str, Any, int]


def api_routes(forge: Forge) -> list[tuple[str, str]]:
    out = []
    for route in forge.dev.app.routes:
        assert isinstance(route, Route)
        if not route.path.startswith("/api/v1"):
            continue
        path = re.sub(r":\w+}", "}", route.path[len("/api/v1") :])
        for method in sorted(route.methods or ()):
            if method != "HEAD":
                out.append((method, path))
    return out


def test_every_devforge_route_is_in_the_spec(forge: Forge) -> None:
    routes = api_routes(forge)
    assert len(routes) >= 15
    missing = [f"{m} {p}" for m, p in routes if m.lower() not in spec()["paths"].get(p, {})]
    assert missing == []


def test_every_response_body_validates(forge: Forge) -> None:
    dev, world = forge.dev, forge.world
    o, r = forge.owner, forge.repo
    dev.create_issue(
        o, r, title="I", body="", user=world.member.login, labels=["bot-bottle:x"], assignees=[world.member.login]
    )
    dev.create_issue(o, r, title="J", body="b", user=world.member.login)  # no assignees: null
    own = dev.comment(o, r, 1, "c", user=world.bot.login)
    sha = dev.commit_files(o, r, "feature", {"f": "x"}, "f")
    run = dev.run_workflow(o, r, sha, {"test": "failure", "lint": "success"}, log="boom\n")
    job = run.jobs[0].id
    headers = {"Authorization": f"token {world.bot.token}"}
    calls = [
        ("GET", "/version", "/version", None, 200),
        ("GET", "/user", "/user", None, 200),
        ("GET", "/orgs/{org}", f"/orgs/{world.org}", None, 200),
        ("GET", "/orgs/{org}/members/{username}", f"/orgs/{world.org}/members/{world.member.login}", None, 204),
        ("GET", "/orgs/{org}/public_members/{username}", f"/orgs/{world.org}/public_members/x", None, 404),
        ("GET", "/repos/{owner}/{repo}", f"/repos/{o}/{r}", None, 200),
        (
            "GET",
            "/repos/{owner}/{repo}/collaborators/{collaborator}/permission",
            f"/repos/{o}/{r}/collaborators/{world.member.login}/permission",
            None,
            200,
        ),
        ("POST", "/repos/{owner}/{repo}/issues", f"/repos/{o}/{r}/issues", {"title": "new"}, 201),
        ("GET", "/repos/{owner}/{repo}/issues/{index}", f"/repos/{o}/{r}/issues/1", None, 200),
        ("GET", "/repos/{owner}/{repo}/issues/{index}", f"/repos/{o}/{r}/issues/2", None, 200),
        ("PATCH", "/repos/{owner}/{repo}/issues/{index}", f"/repos/{o}/{r}/issues/1", {"body": "x"}, 201),
        ("GET", "/repos/{owner}/{repo}/issues/{index}/comments", f"/repos/{o}/{r}/issues/1/comments", None, 200),
        (
            "POST",
            "/repos/{owner}/{repo}/issues/{index}/comments",
            f"/repos/{o}/{r}/issues/1/comments",
            {"body": "hi"},
            201,
        ),
        ("GET", "/repos/{owner}/{repo}/issues/{index}/labels", f"/repos/{o}/{r}/issues/1/labels", None, 200),
        (
            "POST",
            "/repos/{owner}/{repo}/issues/{index}/labels",
            f"/repos/{o}/{r}/issues/2/labels",
            {"labels": ["bot-bottle:x", "unknown"]},
            200,
        ),
        (
            "POST",
            "/repos/{owner}/{repo}/pulls",
            f"/repos/{o}/{r}/pulls",
            {"head": "feature", "base": "main", "title": "PR"},
            201,
        ),
        (
            "POST",
            "/repos/{owner}/{repo}/pulls",
            f"/repos/{o}/{r}/pulls",
            {"head": "feature", "base": "main", "title": "PR"},
            409,
        ),
        ("GET", "/repos/{owner}/{repo}/pulls", f"/repos/{o}/{r}/pulls", None, 200),
        ("GET", "/repos/{owner}/{repo}/pulls/{index}", f"/repos/{o}/{r}/pulls/4", None, 200),
        ("GET", "/repos/{owner}/{repo}/pulls/{index}/merge", f"/repos/{o}/{r}/pulls/4/merge", None, 404),
        ("POST", "/repos/{owner}/{repo}/pulls/{index}/merge", f"/repos/{o}/{r}/pulls/4/merge", {"Do": "merge"}, 200),
        ("GET", "/repos/{owner}/{repo}/pulls/{index}", f"/repos/{o}/{r}/pulls/99", None, 404),
        *ci_calls(o, r, sha, own.id, run.id, job),
    ]
    covered = set()
    with httpx.Client(base_url=forge.api, headers=headers) as http:
        for method, template, path, body, status in calls:
            response = http.request(method, path, json=body)
            assert response.status_code == status, (method, path, response.text)
            covered.add((method, template))
            schema = response_schema(template, method, status)
            if schema is not None:
                validate(schema, response.json())
            elif response.content and status >= 400:
                assert set(response.json()) >= {"message", "url"}
            elif template.endswith("/logs"):
                assert response.text == "boom\n" and response.headers["content-type"].startswith("text/plain")
    assert covered == set(api_routes(forge)), "every devforge API route must be exercised"


def ci_calls(o: str, r: str, sha: str, comment: int, run: int, job: int) -> list[Call]:
    """The calls of issue 19's routes: reactions, comments by id, statuses, Actions, hooks, labels."""
    repo = "/repos/{owner}/{repo}"
    hook = {"type": "gitea", "config": {"url": "http://127.0.0.1:9/h", "content_type": "json", "secret": "s"}}
    return [
        ("POST", f"{repo}/issues/{{index}}/reactions", f"/repos/{o}/{r}/issues/1/reactions", {"content": "eyes"}, 201),
        ("POST", f"{repo}/issues/{{index}}/reactions", f"/repos/{o}/{r}/issues/1/reactions", {"content": "eyes"}, 200),
        ("GET", f"{repo}/issues/{{index}}/reactions", f"/repos/{o}/{r}/issues/1/reactions", None, 200),
        (
            "POST",
            f"{repo}/issues/comments/{{id}}/reactions",
            f"/repos/{o}/{r}/issues/comments/{comment}/reactions",
            {"content": "eyes"},
            201,
        ),
        (
            "GET",
            f"{repo}/issues/comments/{{id}}/reactions",
            f"/repos/{o}/{r}/issues/comments/{comment}/reactions",
            None,
            200,
        ),
        ("GET", f"{repo}/issues/comments/{{id}}", f"/repos/{o}/{r}/issues/comments/{comment}", None, 200),
        ("PATCH", f"{repo}/issues/comments/{{id}}", f"/repos/{o}/{r}/issues/comments/{comment}", {"body": "e"}, 200),
        ("GET", f"{repo}/issues/comments/{{id}}", f"/repos/{o}/{r}/issues/comments/99999", None, 404),
        (
            "POST",
            f"{repo}/statuses/{{sha}}",
            f"/repos/{o}/{r}/statuses/{sha}",
            {"state": "failure", "context": "c"},
            201,
        ),
        ("POST", f"{repo}/statuses/{{sha}}", f"/repos/{o}/{r}/statuses/{sha}", {"state": "bogus"}, 400),
        ("GET", f"{repo}/commits/{{ref}}/statuses", f"/repos/{o}/{r}/commits/{sha}/statuses", None, 200),
        ("GET", f"{repo}/commits/{{ref}}/statuses", f"/repos/{o}/{r}/commits/feature/statuses", None, 200),
        ("GET", f"{repo}/actions/runs", f"/repos/{o}/{r}/actions/runs?head_sha={sha}", None, 200),
        ("GET", f"{repo}/actions/runs/{{run}}/jobs", f"/repos/{o}/{r}/actions/runs/{run}/jobs", None, 200),
        ("GET", f"{repo}/actions/jobs/{{job_id}}", f"/repos/{o}/{r}/actions/jobs/{job}", None, 200),
        ("GET", f"{repo}/actions/jobs/{{job_id}}/logs", f"/repos/{o}/{r}/actions/jobs/{job}/logs", None, 200),
        ("GET", f"{repo}/actions/jobs/{{job_id}}", f"/repos/{o}/{r}/actions/jobs/99999", None, 404),
        ("POST", f"{repo}/hooks", f"/repos/{o}/{r}/hooks", {**hook, "events": ["status"], "active": True}, 201),
        ("POST", f"{repo}/hooks", f"/repos/{o}/{r}/hooks", {**hook, "type": "slack"}, 422),
        ("GET", f"{repo}/hooks", f"/repos/{o}/{r}/hooks", None, 200),
        ("POST", f"{repo}/labels", f"/repos/{o}/{r}/labels", {"name": "bot-bottle:y", "color": "#00aabb"}, 201),
        ("POST", f"{repo}/labels", f"/repos/{o}/{r}/labels", {"name": "z", "color": "red"}, 422),
        ("GET", f"{repo}/labels", f"/repos/{o}/{r}/labels", None, 200),
        ("GET", f"{repo}/branches/{{branch}}", f"/repos/{o}/{r}/branches/feature", None, 200),
        ("GET", f"{repo}/branches/{{branch}}", f"/repos/{o}/{r}/branches/nope", None, 404),
    ]


def test_webhook_entities_validate(forge: Forge) -> None:
    dev, world = forge.dev, forge.world
    seen: list[dict[str, Any]] = []
    hook_url = "http://127.0.0.1:9/unused"
    dev.add_hook(forge.owner, forge.repo, hook_url, "s")
    dev.create_issue(forge.owner, forge.repo, title="I", body="<b>&", user=world.member.login)
    dev.comment(forge.owner, forge.repo, 1, "c", user=world.member.login)
    dev.commit_files(forge.owner, forge.repo, "feature", {"f": "x"}, "f")
    dev.create_pr(forge.owner, forge.repo, head="feature", base="main", title="PR", body="", user=world.bot.login)
    dev.review(forge.owner, forge.repo, 2, "lgtm", user=world.member.login, kind="approved")
    for delivery in dev.wait_deliveries():
        # Go's encoder escapes <, > and & and indents by two spaces, with no trailing newline.
        assert b"<" not in delivery.body and b"&" not in delivery.body
        assert delivery.body.startswith(b'{\n  "') and not delivery.body.endswith(b"\n")
        seen.append(json.loads(delivery.body))
    assert b"\\u003cb\\u003e\\u0026" in dev.deliveries[0].body
    assert len(seen) == 4
    for payload in seen:
        validate({"$ref": "#/definitions/User"}, payload["sender"])
        validate({"$ref": "#/definitions/Repository"}, payload["repository"])
        if "issue" in payload:
            validate({"$ref": "#/definitions/Issue"}, payload["issue"])
        if "comment" in payload:
            validate({"$ref": "#/definitions/Comment"}, payload["comment"])
        if "pull_request" in payload:
            validate({"$ref": "#/definitions/PullRequest"}, payload["pull_request"])


# DESIGN.md §1: devforge imports nothing of ours but statemachine/config where it must.
OURS = {"forgebottle", "gitea", "store", "sidecar", "bottles", "forge_client", "rules", "service", "web", "egress"}
THIRD_PARTY = {"starlette", "uvicorn", "httpx"}


def test_devforge_is_a_package_of_small_modules_that_imports_nothing_of_ours() -> None:
    modules = sorted((ROOT / "devforge").glob("*.py"))
    assert len(modules) >= 8
    for path in modules:
        source = path.read_text()
        assert source.count("\n") <= 600, f"{path.name} is over 600 lines"
        tree = ast.parse(source)
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef):
                assert node.end_lineno is not None
                assert node.end_lineno - node.lineno < 400, f"{path.name}: class {node.name} is over 400 lines"
            imported = []
            if isinstance(node, ast.Import):
                imported = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                imported = [node.module]
            for name in imported:
                top = name.split(".")[0]
                assert top not in OURS, f"{path.name} imports {name}"
                assert top in sys.stdlib_module_names or top in THIRD_PARTY | {"statemachine", "config"}, name


def test_the_names_tests_benchmarks_and_the_cli_use_are_still_there() -> None:
    for name in ("DevForge", "seed", "Seeded", "ServerThread", "sign", "go_json", "loopback_socket"):
        assert name in df.__all__ and callable(getattr(df, name))
    for name in ("Delivery", "HookRec", "IssueRec", "UserRec", "DevForgeError", "DevForgeApi"):
        assert isinstance(getattr(df, name), type)
    # Issue 19's: `forgebottle devforge --flavor` offers FLAVORS; the demo's CI round uses scripted_ci.
    assert df.FLAVORS == ("gitea", "forgejo") and callable(df.scripted_ci)
    assert "eyes" in df.REACTIONS and "failure" in df.STATES and "failure" in df.CONCLUSIONS
    for name in ("StatusRec", "RunRec", "JobRec", "ReactionRec"):
        assert isinstance(getattr(df, name), type)
    # Through the package: Go's escaping and Gitea's bare-hex signature.
    assert df.go_json({"a": "<&>"}) == b'{\n  "a": "\\u003c\\u0026\\u003e"\n}'
    assert df.sign("s", b"{}") == hmac.new(b"s", b"{}", hashlib.sha256).hexdigest()


def test_ci_and_comment_edit_webhook_entities_validate(forge: Forge) -> None:
    dev, world, o, r = forge.dev, forge.world, forge.owner, forge.repo
    events = ("status", "workflow_run", "workflow_job", "issues", "pull_request")
    dev.add_hook(o, r, "http://127.0.0.1:9/unused", "s", events=events)
    dev.create_issue(o, r, title="I", body="", user=world.member.login)
    rec = dev.comment(o, r, 1, "before", user=world.bot.login)
    dev.edit_comment(o, r, rec.id, "after <b>", user=world.bot.login)
    sha = dev.commit_files(o, r, "feature", {"f": "x"}, "f")
    dev.create_pr(o, r, head="feature", base="main", title="PR", body="", user=world.bot.login)
    dev.run_workflow(o, r, sha, {"test": "failure"}, log="x")
    dev.create_status(o, r, sha, state="success", context="ext", target_url="http://ci/1", user=world.bot.login)
    kinds: dict[str, int] = {}
    for delivery in dev.wait_deliveries():
        payload = json.loads(delivery.body)
        kinds[delivery.event_type] = kinds.get(delivery.event_type, 0) + 1
        validate({"$ref": "#/definitions/User"}, payload["sender"])
        validate({"$ref": "#/definitions/Repository"}, payload["repository"])
        if delivery.event_type == "issue_comment":
            if payload["action"] == "edited":
                assert payload["changes"] == {"body": {"from": "before"}}
                assert payload["comment"]["body"] == "after <b>"
            validate({"$ref": "#/definitions/Comment"}, payload["comment"])
        elif delivery.event_type == "status":
            assert payload["sha"] == sha and payload["state"] in df.STATES
            validate({"$ref": "#/definitions/PayloadCommit"}, payload["commit"])
        elif delivery.event_type == "workflow_run":
            validate({"$ref": "#/definitions/ActionWorkflowRun"}, payload["workflow_run"])
            validate({"$ref": "#/definitions/ActionWorkflow"}, payload["workflow"])
            validate({"$ref": "#/definitions/PullRequest"}, payload["pull_request"])
            assert payload["workflow_run"]["head_sha"] == sha
        elif delivery.event_type == "workflow_job":
            validate({"$ref": "#/definitions/ActionWorkflowJob"}, payload["workflow_job"])
            assert payload["workflow_job"]["head_sha"] == sha
    # The issue and PR opened, the comment and its edit; the run and job each thrice;
    # the job's pending and failure statuses and the external one.
    assert kinds == {
        "issues": 1,
        "issue_comment": 2,
        "pull_request": 1,
        "workflow_run": 3,
        "workflow_job": 3,
        "status": 3,
    }
