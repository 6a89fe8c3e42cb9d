"""The operator's status pages (DESIGN.md §13): plain server-rendered HTML, no JavaScript.

Everything shown comes from the store and the provenance record, escaped on the way out: an
agent's summary, a comment's reason or an issue title is data, never markup.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping, Sequence
from html import escape
from typing import Any

from provenance import run_outcome
from store import ForgeState

STYLE = """
body{font:14px/1.45 system-ui,sans-serif;margin:2rem auto;max-width:72rem;padding:0 1rem;color:#1b1f24}
h1{font-size:1.4rem;margin:0 0 .2rem}h2{font-size:1.1rem;margin:1.6rem 0 .4rem}
table{border-collapse:collapse;width:100%}th,td{text-align:left;padding:.3rem .5rem;border-bottom:1px solid #d8dee4;
vertical-align:top}th{background:#f6f8fa;font-weight:600}code,pre{font:12px ui-monospace,monospace}
pre{background:#f6f8fa;padding:.6rem;overflow:auto;max-height:30rem;white-space:pre-wrap}
.state{font-weight:600}.running{color:#1a7f37}.queued{color:#9a6700}.frozen{color:#0969da}.destroyed{color:#6e7781}
.denied{color:#cf222e}.error{color:#bc4c00}.muted{color:#6e7781}
"""


def _age(stamp: str | None, now: dt.datetime) -> str:
    if not stamp:
        return "-"
    try:
        seconds = max(0, int((now - dt.datetime.fromisoformat(stamp)).total_seconds()))
    except ValueError:
        return "-"
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def _link(url: str, text: str) -> str:
    if not url.startswith(("http://", "https://")):
        return escape(text)
    return f'<a href="{escape(url, quote=True)}">{escape(text)}</a>'


def _page(title: str, body: str) -> str:
    return (
        f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{escape(title)}</title>'
        f'<meta name="viewport" content="width=device-width"><style>{STYLE}</style></head><body>{body}</body></html>'
    )


def index_page(
    states: Sequence[ForgeState],
    outcomes: Mapping[str, str],
    events: Sequence[Mapping[str, Any]],
    *,
    version: str,
    forge_problem: str | None,
) -> str:
    """Live bottles with their state, links, last outcome and age; then recent ignored events."""
    now = dt.datetime.now(dt.UTC)
    rows = []
    for s in states:
        issue = _link(s.issue_url, f"{s.owner}/{s.repo}#{s.issue_number}")
        pr = _link(s.pr_url, f"#{s.pr_number}") if s.pr_number else "-"
        rows.append(
            f'<tr><td><a href="bottles/{escape(s.slug, quote=True)}">{escape(s.slug)}</a></td>'
            f'<td class="state {s.status.value}">{s.status.value}</td><td>{escape(s.agent_name)}</td>'
            f"<td>{issue}</td><td>{pr}</td><td>{escape(outcomes.get(s.slug, '-'))}</td>"
            f"<td>{_age(s.created_at, now)}</td><td>{_age(s.last_checkin_at, now)}</td></tr>"
        )
    table = (
        "<table><tr><th>Bottle</th><th>State</th><th>Agent</th><th>Issue</th><th>PR</th><th>Last outcome</th>"
        "<th>Age</th><th>Check-in</th></tr>" + "".join(rows) + "</table>"
        if rows
        else '<p class="muted">No live bottles.</p>'
    )
    ignored = "".join(
        f"<tr><td>{e['id']}</td><td>{escape(str(e['received_at']))}</td><td>{escape(str(e['event_type']))}</td>"
        f"<td>{escape(str(e['reason']))}</td></tr>"
        for e in events
    )
    health = (
        f'<p class="error">Forge: {escape(forge_problem)}</p>' if forge_problem else '<p class="muted">Forge: ok</p>'
    )
    body = (
        f"<h1>forgebottle</h1><p class='muted'>version {escape(version)}</p>{health}"
        f"<h2>Live bottles</h2>{table}"
        "<h2>Recently ignored events</h2>"
        + (
            f"<table><tr><th>Event</th><th>Received</th><th>Type</th><th>Why ignored</th></tr>{ignored}</table>"
            if ignored
            else '<p class="muted">None.</p>'
        )
    )
    return _page("forgebottle", body)


def bottle_page(doc: Mapping[str, Any], log_tail: str) -> str:
    """One bottle: its runs, operations, transitions and the end of its latest run's log."""
    forge = doc["forge"]
    runs = "".join(
        f"<tr><td>{r['n']}</td><td>{escape(str(r['trigger']))}</td><td>{escape(str(r['started_at']))}</td>"
        f"<td>{escape(str(r['ended_at'] or 'running'))}</td><td>{escape(run_outcome(r))}</td>"
        f"<td>{r['secret_scan']['findings']}</td></tr>"
        for r in doc["runs"]
    )
    ops = "".join(
        f"<tr class='{escape(o['outcome'])}'><td>{o['seq']}</td><td>{o['run']}</td><td>{escape(o['at'])}</td>"
        f"<td>{escape(o['op'])}</td><td>{escape(o['outcome'])}</td><td>{escape(o['detail'])}</td></tr>"
        for o in doc["operations"]
    )
    transitions = "".join(
        f"<tr><td>{escape(t['at'])}</td><td>{escape(t['source'])} → {escape(t['dest'])}</td>"
        f"<td>{escape(t['trigger'])}</td><td>{escape(t['reason'])}</td></tr>"
        for t in doc["transitions"]
    )
    chain = doc["chain"]
    verdict = "verified" if chain["verified"] else f"BROKEN at operation {chain.get('broken_seq')}"
    pr = f", PR {_link(forge['pr_url'], '#' + str(forge['pr']))}" if forge["pr"] else ""
    body = (
        f"<p><a href='../'>← all bottles</a></p><h1>{escape(doc['slug'])}</h1>"
        f"<p><span class='state {escape(doc['status'])}'>{escape(doc['status'])}</span> · agent "
        f"{escape(doc['agent'])} · sandbox {escape(doc['sandbox'])} · issue "
        f"{_link(forge['issue_url'], '#' + str(forge['issue']))}{pr}</p>"
        "<h2>Runs</h2><table><tr><th>Run</th><th>Trigger</th><th>Started</th><th>Ended</th><th>Outcome</th>"
        f"<th>Secret findings</th></tr>{runs}</table>"
        "<h2>Operations</h2><table><tr><th>#</th><th>Run</th><th>At</th><th>Op</th><th>Outcome</th><th>What</th>"
        f"</tr>{ops}</table><p class='muted'>Chain {verdict}; head <code>{escape(chain['head'])}</code></p>"
        f"<h2>Transitions</h2><table><tr><th>At</th><th>Move</th><th>Trigger</th><th>Reason</th></tr>{transitions}"
        f"</table><h2>Log of the latest run</h2><pre>{escape(log_tail) or '(empty)'}</pre>"
    )
    return _page(f"forgebottle: {doc['slug']}", body)
