"""A Gitea-compatible development forge: the API subset forgebottle calls, Gitea's quirks included.

What it reproduces from Gitea 1.26 (../shared/gitea/CONTRACT.md):

* error bodies ``{"message", "url"}`` (404 adds ``"errors": null``), 401 without a token;
* ``PATCH /issues/{n}`` answers 201; comments are not paginated; a duplicate PR is 409;
* ``assignees`` is ``null`` on an empty issue but ``[]`` on a PR; users carry ``username``;
* org membership: 204/404 for members and admins, 303 to ``public_members`` for others;
* webhooks signed as Gitea signs them (bare hex HMAC-SHA256 of the JSON, also for form hooks),
  every header of CONTRACT.md §1, the JSON indented by two spaces with ``<>&`` escaped, a 5 s
  timeout and no retry;
* git smart HTTP through ``git http-backend``, token required (basic auth or ``token`` header);
* reactions, comment edits, hooks (inactive unless asked, secret never returned), labels,
  commit statuses and Actions runs/jobs/logs driven by ``run_workflow``, with the ``status``,
  ``workflow_run`` and ``workflow_job`` webhooks (CONTRACT.md §7);
* ``DevForge(..., flavor="forgejo")``: Forgejo's ``X-Forgejo-*`` headers instead of Gitea's.

State lives in memory (git repositories on disk under ``root``). Tests and ``forgebottle demo``
set it up through the Python methods (``add_user``, ``create_repo``, ``create_issue`` ...), which
also fire the webhooks a real Gitea would.

The package, one idea a module: ``records`` (the dataclasses), ``world`` (lookups and
permissions), ``render`` (Gitea's JSON), ``ci`` (commit statuses and Actions), ``forge``
(``DevForge``: the setup API and the webhooks it fires), ``webhooks`` (payload bytes, signing,
delivery), ``api`` (``DevForgeApi``: the HTTP routes), ``api_repo`` (the routes for reactions,
statuses, Actions, hooks, labels and branches), ``gitcmd``/``githttp`` (git plumbing and smart
HTTP), ``serving`` (``ServerThread``), ``seed`` (the demo's world) and ``demo`` (``forgebottle
demo``, imported on its own).
"""

from __future__ import annotations

from .api import GITEA_VERSION, DevForgeApi
from .ci import CONCLUSIONS, STATES, scripted_ci
from .forge import REACTIONS, DevForge
from .githttp import MAX_GIT_BODY
from .records import (
    CommentRec,
    Delivery,
    DevForgeError,
    HookRec,
    IssueRec,
    JobRec,
    LabelRec,
    OrgRec,
    PullRec,
    ReactionRec,
    RepoRec,
    RunRec,
    StatusRec,
    UserRec,
    now,
)
from .seed import Seeded, seed
from .serving import ServerThread, loopback_socket
from .webhooks import COARSE_EVENT, DELIVER_TIMEOUT, FLAVORS, SUBSCRIPTIONS, Flavor, Outbox, go_json, sign

__all__ = [
    "COARSE_EVENT",
    "CONCLUSIONS",
    "DELIVER_TIMEOUT",
    "FLAVORS",
    "GITEA_VERSION",
    "MAX_GIT_BODY",
    "REACTIONS",
    "STATES",
    "SUBSCRIPTIONS",
    "CommentRec",
    "Delivery",
    "DevForge",
    "DevForgeApi",
    "DevForgeError",
    "Flavor",
    "HookRec",
    "IssueRec",
    "JobRec",
    "LabelRec",
    "OrgRec",
    "Outbox",
    "PullRec",
    "ReactionRec",
    "RepoRec",
    "RunRec",
    "Seeded",
    "ServerThread",
    "StatusRec",
    "UserRec",
    "go_json",
    "loopback_socket",
    "now",
    "scripted_ci",
    "seed",
    "sign",
]
