"""The small world ``forgebottle devforge`` and the demo start from."""

from __future__ import annotations

import dataclasses

from .forge import DevForge
from .records import UserRec


@dataclasses.dataclass
class Seeded:
    forge: DevForge
    admin: UserRec
    bot: UserRec
    member: UserRec
    outsider: UserRec
    org: str
    owner: str
    repo: str


def seed(forge: DevForge, *, org: str = "bot-bottle", owner: str = "alice", repo: str = "demo") -> Seeded:
    """An admin, the bot, an org member owning ``owner/repo`` (the bot its admin), an outsider."""
    admin = forge.add_user("root", admin=True)
    member = forge.add_user(owner)
    bot = forge.add_user("bottle-bot")
    outsider = forge.add_user("mallory")
    forge.add_org(org, members=[member.login, bot.login])
    forge.create_repo(
        owner, repo, {"README.md": f"# {repo}\n\nA repository for forgebottle.\n"}, collaborators={bot.login: "admin"}
    )
    return Seeded(forge, admin, bot, member, outsider, org, owner, repo)
