"""The provenance record of a bottle (DESIGN.md §8): the JSON document and its summary."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from statemachine import branch_for
from store import ForgeState, Operation, Store, verify_chain

MAX_DENIED_LISTED = 100  # per run; the count of denials is always whole


def bottle_view(state: ForgeState) -> dict[str, Any]:
    data = state.as_json()
    data["branch"] = branch_for(state.issue_number)
    for private in ("chain_head", "queued_seq"):
        data.pop(private, None)
    return data


def run_view(run: Mapping[str, Any], ops: Sequence[Operation] = ()) -> dict[str, Any]:
    """One run of the record (DESIGN.md §8) from its row in the store and its operations."""
    signalled = None
    if run["signalled_status"]:
        signalled = {"status": run["signalled_status"], "summary": run["signalled_summary"] or ""}
    usage = usage_summary(ops)
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
        "egress": egress_summary(run["network"], ops),
        "usage": usage,
        "budget": budget_summary(run["budget_tokens"], ops, usage),
        "sandbox": run["sandbox"],
        **({"error": run["error"]} if run["error"] else {}),
    }


def bottle_views(store: Store, states: Iterable[ForgeState]) -> list[dict[str, Any]]:
    """``bottle_view`` of each, with its count of refused egress (``/api/bottles``, status)."""
    denied = store.egress_denials()
    return [{**bottle_view(s), "egress_denied": denied.get(s.slug, 0)} for s in states]


def egress_summary(network: str, ops: Sequence[Operation]) -> dict[str, Any]:
    """A run's ``egress`` (DESIGN.md §8): sums over its chained egress and model operations."""
    hosts: dict[tuple[str, int], dict[str, Any]] = {}
    denied: list[dict[str, Any]] = []
    count = 0
    for op in ops:
        if op.op not in ("egress", "model") or op.data is None:
            continue
        host, port = str(op.data.get("host", "")), int(op.data.get("port", 0) or 0)
        entry = hosts.setdefault(
            (host, port), {"host": host, "port": port, "connections": 0, "bytes_up": 0, "bytes_down": 0, "denied": 0}
        )
        if op.outcome == "denied":
            entry["denied"] += 1
            count += 1
            if len(denied) < MAX_DENIED_LISTED:
                denied.append({"host": host, "port": port, "reason": str(op.data.get("reason", op.detail))})
            continue
        entry["connections"] += 1
        entry["bytes_up"] += int(op.data.get("bytes_up", 0))
        entry["bytes_down"] += int(op.data.get("bytes_down", 0))
    listed = [h for h in hosts.values() if h["host"] and h["host"] != "-"]
    if network != "gateway" and not hosts:
        return {"network": network}  # no gateway, nothing to sum
    summary: dict[str, Any] = {"network": network, "hosts": listed, "denied": denied}
    if count > len(denied):
        summary["denied_total"] = count
    return summary


def usage_summary(ops: Sequence[Operation]) -> dict[str, dict[str, int]]:
    """A run's ``usage`` per model route: requests and the token counts its answers reported."""
    usage: dict[str, dict[str, int]] = {}
    for op in ops:
        if op.op != "model" or op.data is None or op.outcome == "denied":
            continue
        totals = usage.setdefault(str(op.data.get("model", "")), {"requests": 0})
        totals["requests"] += 1
        for key, value in dict(op.data.get("usage") or {}).items():
            totals[key] = totals.get(key, 0) + int(value)
    return usage


def budget_summary(tokens: int | None, ops: Sequence[Operation], usage: dict[str, dict[str, int]]) -> dict[str, Any]:
    used = sum(u.get("input_tokens", 0) + u.get("output_tokens", 0) for u in usage.values())
    refused = any(op.op == "model" and op.outcome == "denied" and op.data and "budget" in op.data for op in ops)
    return {"tokens": tokens, "used": used, "exhausted": refused or (tokens is not None and used >= tokens)}


def provenance(store: Store, slug: str, *, api_url: str = "", org: str = "") -> dict[str, Any]:
    state = store.known(slug)
    ops = store.operations(slug)
    check = verify_chain(slug, ops, head=state.chain_head, count=state.op_count)
    by_run: dict[int, list[Operation]] = {}
    for op in ops:
        by_run.setdefault(op.run, []).append(op)
    runs = [run_view(run, by_run.get(int(run["n"]), [])) for run in store.runs(slug)]
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


def run_outcome(run: Mapping[str, Any]) -> str:
    """How a run of the record ended, in a few words (the summary, the status pages)."""
    signalled = run.get("signalled") or {}
    if signalled:
        return f"signalled {signalled['status']}: {signalled.get('summary', '')[:200]}"
    if run.get("watchdog_fired"):
        return "stopped by the watchdog"
    if run.get("error"):
        return str(run["error"])[:200]
    return "running" if run.get("ended_at") is None else f"exited {run.get('exit_code')} without signalling"


def summary(doc: dict[str, Any]) -> str:
    """The record for a person: the bottle, each run, the operations and transitions, the chain."""
    forge = doc["forge"]
    lines = [
        f"{doc['slug']}: {doc['status']}; agent {doc['agent']}, {doc['backend']} bottle, sandbox {doc['sandbox']}",
        f"  issue {forge['issue_url'] or '#' + str(forge['issue'])}"
        + (f"; pull request {forge['pr_url'] or '#' + str(forge['pr'])}" if forge["pr"] else ""),
    ]
    for run in doc["runs"]:
        outcome = run_outcome(run)
        scan = run["secret_scan"]["findings"]
        lines.append(
            f"  run {run['n']} ({run['trigger']}, {run['started_at']} .. {run['ended_at'] or 'running'}): {outcome}"
            + (f"; secret scan refused {scan}" if scan else "")
        )
        for model, used in run.get("usage", {}).items():
            budget = run.get("budget") or {}
            cap = f" of a budget of {budget['tokens']}" if budget.get("tokens") else ""
            spent = "; budget exhausted" if budget.get("exhausted") else ""
            lines.append(
                f"      model {model}: {used.get('requests', 0)} calls, {used.get('input_tokens', 0)} tokens in, "
                f"{used.get('output_tokens', 0)} out{cap}{spent}"
            )
        egress = run.get("egress") or {}
        if egress.get("hosts") or egress.get("denied"):
            hosts = ", ".join(f"{h['host']}:{h['port']}" for h in egress.get("hosts", [])[:5]) or "none"
            refused = egress.get("denied_total", len(egress.get("denied", [])))
            lines.append(f"      egress: {hosts}; {refused} refused")
    for op in doc["operations"]:
        mark = {"ok": " ", "denied": "!", "error": "x"}.get(op["outcome"], "?")
        lines.append(f"  {mark} {op['seq']:>3} run {op['run']}  {op['detail']}")
    for tr in doc["transitions"]:
        lines.append(f"  {tr['at']}  {tr['source']} -> {tr['dest']} ({tr['trigger']}: {tr['reason'][:100]})")
    chain = doc["chain"]
    state = "verified" if chain["verified"] else f"BROKEN at operation {chain.get('broken_seq')}"
    lines.append(f"  chain {state}: {len(doc['operations'])} operations, head {chain['head'][:16]}")
    return "\n".join(lines)
