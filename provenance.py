"""The provenance record of a bottle (DESIGN.md §8): the JSON document and its summary."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from statemachine import branch_for
from store import ForgeState, Store, verify_chain


def bottle_view(state: ForgeState) -> dict[str, Any]:
    data = state.as_json()
    data["branch"] = branch_for(state.issue_number)
    for private in ("chain_head", "queued_seq"):
        data.pop(private, None)
    return data


def run_view(run: Mapping[str, Any]) -> dict[str, Any]:
    """One run of the record (DESIGN.md §8) from its row in the store."""
    signalled = None
    if run["signalled_status"]:
        signalled = {"status": run["signalled_status"], "summary": run["signalled_summary"] or ""}
    return {
        "n": run["n"],
        "trigger": run["trigger"],
        "prompt_sha256": run["prompt_sha256"],
        "started_at": run["started_at"],
        "ended_at": run["ended_at"],
        "exit_code": run["exit_code"],
        "signalled": signalled,
        "watchdog_fired": bool(run["watchdog_fired"]),
        "secret_scan": {"tool": "detect-secrets", "findings": int(run["secret_findings"])},
        "egress": {"network": run["network"]},
        "sandbox": run["sandbox"],
        **({"error": run["error"]} if run["error"] else {}),
    }


def provenance(store: Store, slug: str, *, api_url: str = "", org: str = "") -> dict[str, Any]:
    state = store.known(slug)
    ops = store.operations(slug)
    check = verify_chain(slug, ops, head=state.chain_head, count=state.op_count)
    runs = []
    runs = [run_view(run) for run in store.runs(slug)]
    return {
        "schema": "forgebottle.provenance/v1",
        "slug": slug,
        "agent": state.agent_name,
        "bottles": list(state.bottle_names),
        "backend": state.backend_name,
        "sandbox": state.sandbox,
        "org": state.org or org,
        "status": state.status.value,
        "forge": {
            "kind": "gitea",
            "api_url": state.api_url or api_url,
            "owner": state.owner,
            "repo": state.repo,
            "issue": state.issue_number,
            "pr": state.pr_number,
            "issue_url": state.issue_url,
            "pr_url": state.pr_url,
        },
        "runs": runs,
        "operations": [{**op.content(), "hash": op.hash} for op in ops],
        "transitions": store.transitions(slug),
        "chain": {
            "algorithm": "sha256",
            "head": state.chain_head,
            "verified": check.verified,
            **({"problem": check.problem, "broken_seq": check.broken_seq} if not check.verified else {}),
        },
    }


def summary(doc: dict[str, Any]) -> str:
    """The record for a person: the bottle, each run, the operations and transitions, the chain."""
    forge = doc["forge"]
    lines = [
        f"{doc['slug']}: {doc['status']}; agent {doc['agent']}, {doc['backend']} bottle, sandbox {doc['sandbox']}",
        f"  issue {forge['issue_url'] or '#' + str(forge['issue'])}"
        + (f"; pull request {forge['pr_url'] or '#' + str(forge['pr'])}" if forge["pr"] else ""),
    ]
    for run in doc["runs"]:
        signalled = run["signalled"] or {}
        outcome = (
            f"signalled {signalled['status']}: {signalled.get('summary', '')[:120]}"
            if signalled
            else "watchdog stopped it"
            if run["watchdog_fired"]
            else run.get("error") or f"exited {run['exit_code']} without signalling"
        )
        scan = run["secret_scan"]["findings"]
        lines.append(
            f"  run {run['n']} ({run['trigger']}, {run['started_at']} .. {run['ended_at'] or 'running'}): {outcome}"
            + (f"; secret scan refused {scan}" if scan else "")
        )
    for op in doc["operations"]:
        mark = {"ok": " ", "denied": "!", "error": "x"}.get(op["outcome"], "?")
        lines.append(f"  {mark} {op['seq']:>3} run {op['run']}  {op['detail']}")
    for tr in doc["transitions"]:
        lines.append(f"  {tr['at']}  {tr['source']} -> {tr['dest']} ({tr['trigger']}: {tr['reason'][:100]})")
    chain = doc["chain"]
    state = "verified" if chain["verified"] else f"BROKEN at operation {chain.get('broken_seq')}"
    lines.append(f"  chain {state}: {len(doc['operations'])} operations, head {chain['head'][:16]}")
    return "\n".join(lines)
