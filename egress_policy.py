"""Egress policy: which ``host:port`` a bottle may reach, and at which address (DESIGN.md §10).

Split from ``egress.py`` so that what decides stays apart from what serves: this module parses
what an agent asked for, matches it against ``[egress]`` and the agent's ``egress`` entries, and
resolves names on the host with the address guard. The gateway then connects to exactly the
address the guard returned: there is no second lookup for DNS to answer differently.

Everything here treats the host name as hostile input: it is normalised (lower case, one
trailing dot dropped, IDNA), IP literals are recognised in every spelling ``inet_aton`` and
URL parsers accept (``2130706433``, ``0x7f.1``, ``0177.0.0.1``, ``[::ffff:127.0.0.1]``), and
anything else that is not a plain DNS name is refused before it reaches a resolver.
"""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
import re
import socket
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from urllib.parse import urlsplit

from config import EGRESS_PRESETS
from statemachine import ForgeBottleError

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
DEFAULT_PORT = 443
RESOLVE_SECONDS = 10.0
_LABEL = re.compile(r"^[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?$")
_NUMERIC = re.compile(r"^(?:0x[0-9a-f]*|[0-9]+)$")
# NAT64's well-known prefix carries an IPv4 address in its last 32 bits.
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")


class Denied(ForgeBottleError):
    """A request the gateway refuses. ``str(exc)`` is one line for the agent (it never echoes
    the raw request); ``fix`` is the config line that would allow it, for the operator's log."""

    def __init__(self, reason: str, *, fix: str = "", status: int = 403) -> None:
        super().__init__(reason)
        self.fix = fix
        self.status = status  # 403 refused, 400 malformed, 502 the host is unreachable


def printable(raw: str, limit: int = 80) -> str:
    """Agent input made safe to quote in a record: printable ASCII, bounded."""
    return "".join(c if " " < c < "\x7f" else "?" for c in raw[:limit]) + ("..." if len(raw) > limit else "")


def parse_ipv4_loose(text: str) -> ipaddress.IPv4Address | None:
    """An IPv4 address in any spelling ``inet_aton`` accepts (1 to 4 parts; each decimal, octal
    with a leading 0, or hex with 0x; the last part fills the remaining bytes), else None."""
    parts = text.split(".")
    if not 1 <= len(parts) <= 4:
        return None
    values = []
    for part in parts:
        try:
            if part.startswith("0x"):
                values.append(int(part[2:] or "0", 16))
            elif len(part) > 1 and part.startswith("0"):
                values.append(int(part, 8))
            else:
                values.append(int(part, 10))
        except ValueError:
            return None
    *head, last = values
    if any(v > 255 for v in head) or last >= 256 ** (5 - len(values)):
        return None
    number = last
    for index, value in enumerate(head):
        number += value << (8 * (3 - index))
    return ipaddress.IPv4Address(number)


def parse_host(raw: str) -> tuple[str, IPAddress | None]:
    """(normalised host, its address if it is an IP literal); Denied (400) if it is neither a
    DNS name nor an address."""
    bad = Denied("the request names no valid host", status=400)
    host = raw.strip()
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        if "%" in host:
            raise bad  # a zone id names an interface of the host
        try:
            return _canonical_ip(ipaddress.IPv6Address(host))
        except ValueError:
            raise bad from None
    if ":" in host:
        try:
            return _canonical_ip(ipaddress.IPv6Address(host))
        except ValueError:
            raise bad from None
    host = host.lower()
    if host.endswith("."):
        host = host[:-1]
    try:
        host = host.encode("idna").decode("ascii") if not host.isascii() else host
    except UnicodeError:
        raise bad from None
    labels = host.split(".")
    if not host or len(host) > 253 or not all(_LABEL.match(label) for label in labels):
        raise bad
    if _NUMERIC.match(labels[-1]):
        # Resolvers read a name ending in a number as an IPv4 address: so do we, or refuse it.
        address = parse_ipv4_loose(host)
        if address is None:
            raise bad
        return _canonical_ip(address)
    return host, None


def _canonical_ip(address: IPAddress) -> tuple[str, IPAddress]:
    return str(address), address


def parse_authority(raw: str, *, default_port: int | None) -> tuple[str, IPAddress | None, int]:
    """``host:port``, ``[v6]:port`` or (with a default) ``host``: (host, literal, port)."""
    bad = Denied("the request names no valid host:port", status=400)
    if raw.startswith("["):
        host, _, rest = raw.partition("]")
        host += "]"
        port_text = rest[1:] if rest.startswith(":") else None
        if rest and port_text is None:
            raise bad
    elif raw.count(":") == 1:
        host, _, port_text = raw.partition(":")
    elif ":" in raw:
        raise bad  # a bare IPv6 address has no room for a port
    else:
        host, port_text = raw, None
    if port_text is None:
        if default_port is None:
            raise bad
        port = default_port
    elif port_text.isdigit() and port_text.isascii() and 0 < int(port_text) < 65536:
        port = int(port_text)
    else:
        raise bad
    name, literal = parse_host(host)
    return name, literal, port


def parse_http_url(raw: str) -> tuple[str, IPAddress | None, int, str]:
    """An absolute-form ``http://`` target: (host, literal, port, path with query)."""
    bad = Denied("the request target is not a valid http:// URL", status=400)
    try:
        parts = urlsplit(raw)
    except ValueError:
        raise bad from None
    if parts.scheme.lower() != "http" or not parts.netloc or "@" in parts.netloc:
        raise bad
    host, literal, port = parse_authority(parts.netloc, default_port=80)
    path = parts.path or "/"
    return host, literal, port, path + (f"?{parts.query}" if parts.query else "")


@dataclasses.dataclass(frozen=True)
class Rule:
    entry: str  # as configured, for messages
    name: str
    suffix: bool  # "*.name": subdomains of name, not name itself
    port: int | None

    def matches(self, host: str, port: int, *, default_port: int | None) -> bool:
        wanted = self.port if self.port is not None else default_port
        if wanted is not None and wanted != port:
            return False
        return host.endswith("." + self.name) if self.suffix else host == self.name


def expand(entries: Iterable[str]) -> list[Rule]:
    """Config entries (already validated by ``config``) as rules, presets expanded."""
    rules = []
    for entry in entries:
        if entry.startswith("ecosystem:"):
            rules += [dataclasses.replace(r, entry=entry) for r in expand(EGRESS_PRESETS[entry[10:]])]
            continue
        name, _, port = entry.partition(":")
        suffix = name.startswith("*.")
        rules.append(Rule(entry, name[2:] if suffix else name, suffix, int(port) if port else None))
    return rules


class Policy:
    """Allow (``[egress].allow`` plus the agent's ``egress``) minus block; block wins. An allow
    entry without a port opens 443; a block entry without a port closes every port."""

    def __init__(self, allow: Sequence[str], block: Sequence[str], *, read_only: bool) -> None:
        self.allow = expand(allow)
        self.block = expand(block)
        self.read_only = read_only

    def check(self, host: str, port: int) -> None:
        for rule in self.block:
            if rule.matches(host, port, default_port=None):
                raise Denied(f"{host}:{port} is blocked", fix=f'remove "{rule.entry}" from [egress].block')
        if not any(rule.matches(host, port, default_port=DEFAULT_PORT) for rule in self.allow):
            entry = host if port == DEFAULT_PORT else f"{host}:{port}"
            raise Denied(f"{host}:{port} is not allowed", fix=f'[egress] allow = ["{entry}"]')

    def check_method(self, method: str) -> None:
        """``read_only`` lets through only reads on what the gateway can see (plain HTTP, model
        routes); inside a CONNECT tunnel the methods are TLS-encrypted and not inspected."""
        if self.read_only and method not in SAFE_METHODS:
            raise Denied(f"{printable(method, 16)} is refused: egress is read-only", fix="[egress] read_only = false")


def address_problem(address: IPAddress) -> str | None:
    """Why ``address`` is not a public one, if it is not: addresses embedding IPv4 (mapped,
    6to4, Teredo, NAT64) are judged by the IPv4 address they carry."""
    if isinstance(address, ipaddress.IPv6Address):
        embedded = address.ipv4_mapped or address.sixtofour
        if address.teredo:
            embedded = address.teredo[1]
        if address in _NAT64:
            embedded = ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
        if embedded is not None:
            return address_problem(embedded)
    for problem, flag in (
        ("loopback", address.is_loopback),
        ("link-local", address.is_link_local),
        ("unspecified", address.is_unspecified),
        ("multicast", address.is_multicast),
        ("private", address.is_private),
        ("reserved", address.is_reserved),
    ):
        if flag:
            return problem
    return None if address.is_global else "non-public"


def own_addresses() -> set[IPAddress]:
    """The addresses this host answers on (Linux): a public one is still the host itself."""
    found: set[IPAddress] = set()
    try:
        last = ""
        for line in Path("/proc/net/fib_trie").read_text().splitlines():
            text = line.strip()
            if text.startswith(("|--", "+--")):
                last = text[3:].strip().split("/")[0]
            elif text.startswith("/32 host LOCAL") and last:
                found.add(ipaddress.IPv4Address(last))
    except (OSError, ValueError):
        pass
    try:
        for line in Path("/proc/net/if_inet6").read_text().splitlines():
            found.add(ipaddress.IPv6Address(int(line.split()[0], 16)))
    except (OSError, ValueError, IndexError):
        pass
    return found


class Guard:
    """Resolves names on the host and refuses addresses a bottle must not reach: loopback,
    link-local, private and other non-public ones, the host's own and the forge's, unless the
    name is mapped in ``[egress].resolve`` (the only way to a non-public address)."""

    def __init__(self, resolve: Mapping[str, str], *, forge_host: str = "") -> None:
        self.resolve = dict(resolve)
        self.forge_host = forge_host.lower().rstrip(".")
        self.forbidden: set[IPAddress] = set()

    async def start(self) -> None:
        """Learn the host's own addresses and the forge's (off the event loop: a lookup)."""
        self.forbidden = await asyncio.to_thread(own_addresses)
        if self.forge_host and self.forge_host not in self.resolve:
            try:
                infos = await asyncio.wait_for(
                    asyncio.get_running_loop().getaddrinfo(self.forge_host, None), RESOLVE_SECONDS
                )
            except (OSError, TimeoutError):
                infos = []
            self.forbidden |= {_address(info[4][0]) for info in infos}

    async def address(self, host: str, literal: IPAddress | None, port: int) -> str:
        """The address to connect to for ``host``: checked, never looked up again."""
        if host in self.resolve:
            return self.resolve[host]
        mapping = f'[egress] resolve = {{ "{host}" = "<address>" }}'
        if host == self.forge_host:
            raise Denied(f"{host} is the forge: reach it through the forge tool", fix=mapping)
        if literal is not None:
            addresses = [literal]
        elif host == "localhost" or host.endswith(".localhost"):
            raise Denied(f"{host} is a loopback name", fix=mapping)
        else:
            try:
                infos = await asyncio.wait_for(
                    asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM), RESOLVE_SECONDS
                )
            except (OSError, TimeoutError):
                raise Denied(f"{host} does not resolve", status=502) from None
            addresses = list(dict.fromkeys(_address(info[4][0]) for info in infos))
            if not addresses:
                raise Denied(f"{host} does not resolve", status=502)
        # Every answer is judged: a name that resolves to one public and one private address
        # must not be a way to the private one.
        for address in addresses:
            problem = address_problem(address)
            if problem is None and address in self.forbidden:
                problem = "this host's own"
            if problem is not None and literal is not None:
                raise Denied(f"{host} is a {problem} address")
            if problem is not None:
                raise Denied(
                    f"{host} resolves to a {problem} address ({address})",
                    fix=mapping.replace("<address>", str(address)),
                )
        return str(addresses[0])


def _address(text: str | int) -> IPAddress:
    return ipaddress.ip_address(str(text).split("%")[0])
