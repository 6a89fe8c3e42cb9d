"""The provenance record of a bottle (DESIGN.md §8): the JSON document and its summary."""

from __future__ import annotations

from typing import Any

from bottles import BottleError, check_slug
from gitea import branch_for
from store import ForgeState, Store, UnknownBottle, verify_chain


def bottle_view(state: ForgeState) -> dict[str, Any]:
    data = state.as_json()
    data["branch"] = branch_for(state.issue_number)
    for private in ("chain_head", "queued_seq"):
        data.pop(private, None)
    return data


def provenance(store: Store, slug: str, *, api_url: str = "", org: str = "") -> dict[str, Any]:
    try:
        check_slug(slug)
    except BottleError:
        raise UnknownBottle(f"invalid slug {slug[:80]!r}") from None
    state = store.by_slug(slug)
    if state is None:
        raise UnknownBottle(f"no bottle {slug!r}")
    ops = store.operations(slug)
    check = verify_chain(slug, ops, head=state.chain_head, count=state.op_count)
    runs = []
    for run in store.runs(slug):
        signalled = None
        if run["signalled_status"]:
            signalled = {"status": run["signalled_status"], "summary": run["signalled_summary"] or ""}
        runs.append(
            {
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
        )
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
