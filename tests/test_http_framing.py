"""gitea's HTTP/1.1 framing (``request_bytes``, ``ResponseParser``) held to h11's reading.

h11 is the reference here (it frames uvicorn's and httpcore's HTTP): whatever well-formed answer
is generated, split into pieces wherever, the parser must find the status, headers, body and
keep-alive h11 finds. What h11 would tolerate but no forge sends, the parser refuses: the table
below pins each refusal.
"""

from __future__ import annotations

import dataclasses
import itertools

import h11
import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gitea import MAX_HEAD_BYTES, ResponseParser, _Stale, request_bytes

TOKEN_CHARS = "!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
FRAMING_HEADERS = {"content-length", "transfer-encoding", "connection"}

names = st.text(TOKEN_CHARS, min_size=1, max_size=12).filter(lambda n: n.lower() not in FRAMING_HEADERS)
# Field values as h11 reads them: visible characters (obs-text included) with inner blanks.
values = st.binary(max_size=30).map(
    lambda b: bytes(c for c in b if c == 0x20 or c == 0x09 or 0x21 <= c <= 0x7E or c >= 0x80).strip(b" \t")
)


@dataclasses.dataclass
class Generated:
    method: str
    wire: bytes
    cuts: list[int]
    framing: str


@st.composite
def answers(draw: st.DrawFn) -> Generated:
    method = draw(st.sampled_from(["GET", "HEAD", "POST", "PATCH"]))
    version = draw(st.sampled_from([b"1.1", b"1.1", b"1.0"]))
    status = draw(st.sampled_from([200, 201, 204, 301, 303, 304, 404, 409, 422, 500]))
    reason = draw(st.sampled_from([b"", b" ", b" OK", b" Not Found", b" a reason: with words"]))
    headers = [(n.encode(), v) for n, v in draw(st.lists(st.tuples(names, values), max_size=6))]
    connection = draw(st.sampled_from([None, b"close", b"keep-alive", b"Keep-Alive, Upgrade"]))
    if connection is not None:
        headers.append((b"Connection", connection))
    framing = draw(st.sampled_from(["length", "chunked", "close"]))
    body = draw(st.binary(max_size=400))
    bodiless = method == "HEAD" or status in (204, 304)
    if framing == "close" and connection is None and version == b"1.1":
        headers.append((b"Connection", b"close"))  # what a server sending such a body says
    trailers: list[tuple[bytes, bytes]] = []
    if framing == "length":
        headers.append((draw(st.sampled_from([b"Content-Length", b"content-length"])), b"%d" % len(body)))
    elif framing == "chunked":
        headers.append((b"Transfer-Encoding", draw(st.sampled_from([b"chunked", b"Chunked"]))))
        trailers = [(n.encode(), v) for n, v in draw(st.lists(st.tuples(names, values), max_size=2))]
    interim = b"".join(
        b"HTTP/1.1 %d Interim\r\nX-Early: %d\r\n\r\n" % (code, code)
        for code in draw(st.lists(st.sampled_from([100, 103]), max_size=2))
    )
    head = b"HTTP/%s %d%s\r\n" % (version, status, reason)
    head += b"".join(name + b": " + value + b"\r\n" for name, value in headers) + b"\r\n"
    payload = b""
    if not bodiless:
        if framing == "chunked":
            cuts = sorted(draw(st.lists(st.integers(0, len(body)), max_size=4)))
            pieces = [body[a:b] for a, b in itertools.pairwise([0, *cuts, len(body)])]
            ext = draw(st.sampled_from([b"", b";name=value", b";x \t"]))
            payload = b"".join(b"%x%s\r\n%s\r\n" % (len(p), ext, p) for p in pieces if p)
            payload += b"0\r\n" + b"".join(n + b": " + v + b"\r\n" for n, v in trailers) + b"\r\n"
        else:
            payload = body
    wire = interim + head + payload
    cuts = sorted(set(draw(st.lists(st.integers(1, max(1, len(wire) - 1)), max_size=8))))
    return Generated(method, wire, cuts, framing)


def pieces(generated: Generated) -> list[bytes]:
    edges = [0, *generated.cuts, len(generated.wire)]
    return [generated.wire[a:b] for a, b in itertools.pairwise(edges) if b > a]


def by_h11(generated: Generated) -> tuple[int, list[tuple[bytes, bytes]], bytes, bool]:
    client = h11.Connection(h11.CLIENT)
    client.send(h11.Request(method=generated.method, target="/", headers=[("Host", "forge")]))
    client.send(h11.EndOfMessage())
    status, headers, body = 0, [], b""
    for data in [*pieces(generated), b""]:
        client.receive_data(data)
        while True:
            event = client.next_event()
            if event is h11.NEED_DATA:
                break
            if isinstance(event, h11.Response):
                status, headers = event.status_code, list(event.headers.raw_items())
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                # An answer that ran to the connection's end leaves nothing to reuse, whatever
                # h11's state says.
                return status, headers, body, client.their_state is h11.DONE and data != b""
    raise AssertionError("h11 did not finish the answer")


def by_parser(generated: Generated) -> tuple[int, list[tuple[bytes, bytes]], bytes, bool]:
    parser = ResponseParser(generated.method)
    for data in [*pieces(generated), b""]:
        if parser.feed(data):
            break
    return parser.status, parser.headers, parser.body, parser.keep_alive


@settings(max_examples=400, deadline=None)
@given(answers())
def test_reads_every_well_formed_answer_as_h11_does(generated: Generated) -> None:
    status, headers, body, keep_alive = by_parser(generated)
    h11_status, h11_headers, h11_body, h11_keep_alive = by_h11(generated)
    # h11 lower-cases Transfer-Encoding's value; the parser keeps values as sent.
    headers = [(n, v.lower() if n.lower() == b"transfer-encoding" else v) for n, v in headers]
    assert (status, headers, body, keep_alive) == (h11_status, h11_headers, h11_body, h11_keep_alive)


def test_an_answer_in_one_piece_or_byte_by_byte_reads_the_same() -> None:
    wire = (
        b"HTTP/1.1 200 OK\r\nX-A: 1\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5\r\nhello\r\n6\r\n world\r\n0\r\nX-Trailer: 1\r\nX-Other: 2\r\n\r\n"
    )
    whole = ResponseParser("GET")
    assert whole.feed(wire)
    trickle = ResponseParser("GET")
    assert [trickle.feed(wire[i : i + 1]) for i in range(len(wire))][-1]
    assert whole.body == trickle.body == b"hello world"
    assert whole.keep_alive and trickle.keep_alive


REFUSED = {
    "not HTTP": b"SSH-2.0-OpenSSH\r\n\r\n",
    "HTTP/2 status line": b"HTTP/2 200 OK\r\n\r\n",
    "status out of range": b"HTTP/1.1 99 Low\r\nContent-Length: 0\r\n\r\n",
    "status not three digits": b"HTTP/1.1 2000 OK\r\nContent-Length: 0\r\n\r\n",
    "header without a colon": b"HTTP/1.1 200 OK\r\nContent-Length 0\r\n\r\n",
    "space before the colon": b"HTTP/1.1 200 OK\r\nContent-Length : 0\r\n\r\n",
    "bare LF inside a head": b"HTTP/1.1 200 OK\nX: 1\r\nContent-Length: 0\r\n\r\n",
    "folded header": b"HTTP/1.1 200 OK\r\nX-A: 1\r\n  continued\r\nContent-Length: 0\r\n\r\n",
    "NUL in a value": b"HTTP/1.1 200 OK\r\nX-A: a\x00b\r\nContent-Length: 0\r\n\r\n",
    "length not a number": b"HTTP/1.1 200 OK\r\nContent-Length: ten\r\n\r\n",
    "negative length": b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
    "two lengths": b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab",
    "length and coding": b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "coding not chunked": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n",
    "chunked not last": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, gzip\r\n\r\n",
    "chunk size not hex": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    "chunk longer than said": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nabc\r\n0\r\n\r\n",
    "huge chunk size": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nffffffffffffffffff\r\n",
    "switching protocols": b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n",
    "closed mid-head": b"HTTP/1.1 200 OK\r\nContent-Le",
    "closed mid-body": b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc",
    "closed mid-chunks": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n",
    "endless head": b"HTTP/1.1 200 OK\r\n" + b"X-Filler: " + b"a" * MAX_HEAD_BYTES,
    "endless chunk line": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1;" + b"x" * 2000,
    "endless trailers": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n"
    + b"X-T: a\r\n" * (MAX_HEAD_BYTES // 8 + 1),
}


@pytest.mark.parametrize("wire", REFUSED.values(), ids=REFUSED.keys())
def test_refuses_what_no_forge_sends(wire: bytes) -> None:
    parser = ResponseParser("GET")
    with pytest.raises(httpx.RemoteProtocolError):
        parser.feed(wire)
        parser.feed(b"")  # the forge closes the connection


def test_bodies_over_the_bound_are_refused_before_they_are_read() -> None:
    with pytest.raises(httpx.RemoteProtocolError, match="over 100 bytes"):
        ResponseParser("GET", max_body=100).feed(b"HTTP/1.1 200 OK\r\nContent-Length: 101\r\n\r\n")
    chunked = ResponseParser("GET", max_body=100)
    chunked.feed(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n50\r\n" + b"a" * 80 + b"\r\n")
    with pytest.raises(httpx.RemoteProtocolError, match="over 100 bytes"):
        chunked.feed(b"50\r\n")
    until_close = ResponseParser("GET", max_body=100)
    until_close.feed(b"HTTP/1.0 200 OK\r\n\r\n" + b"a" * 100)
    with pytest.raises(httpx.RemoteProtocolError, match="over 100 bytes"):
        until_close.feed(b"a")


def test_a_close_before_the_first_byte_is_stale_not_broken() -> None:
    # The pool retries a read on a kept-alive connection the forge had closed: only this case.
    with pytest.raises(_Stale):
        ResponseParser("GET").feed(b"")


def test_bytes_past_the_answer_keep_the_connection_from_reuse() -> None:
    parser = ResponseParser("GET")
    assert parser.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokHTTP/1.1 200 OK\r\n")
    assert parser.body == b"ok"
    assert not parser.keep_alive
    with pytest.raises(httpx.RemoteProtocolError):
        parser.feed(b"more")


requests = st.fixed_dictionaries(
    {
        "method": st.sampled_from(["GET", "HEAD", "POST", "PATCH", "PUT", "DELETE"]),
        "target": st.text("abcxyz0123456789/-._~%?=&", min_size=1, max_size=40).map(lambda t: ("/" + t).encode()),
        "headers": st.lists(st.tuples(names.filter(lambda n: n.lower() != "host").map(str.encode), values), max_size=5),
        "body": st.binary(max_size=200),
    }
)


@settings(max_examples=200, deadline=None)
@given(requests)
def test_requests_are_written_as_h11_reads_them(request: dict[str, object]) -> None:
    method, target, body = request["method"], request["target"], request["body"]
    assert isinstance(method, str) and isinstance(target, bytes) and isinstance(body, bytes)
    headers = [(b"Host", b"forge.example"), *request["headers"]]  # type: ignore[misc]
    if body or method not in ("GET", "HEAD"):
        headers.append((b"Content-Length", b"%d" % len(body)))
    server = h11.Connection(h11.SERVER)
    server.receive_data(request_bytes(method, target, headers, body))
    event = server.next_event()
    assert isinstance(event, h11.Request)
    assert (event.method.decode(), event.target, list(event.headers.raw_items())) == (
        method,
        target,
        headers,
    )
    received = b""
    while not isinstance(event := server.next_event(), h11.EndOfMessage):
        assert isinstance(event, h11.Data)
        received += event.data
    assert received == body


UNSENDABLE = {
    "line break in a value": ("GET", b"/", [(b"Authorization", b"token x\r\nX-Evil: 1")], b""),
    "colon in a name": ("GET", b"/", [(b"X:Y", b"1")], b""),
    "space in the target": ("GET", b"/a b", [], b""),
    "line break in the target": ("GET", b"/a\r\nX: 1", [], b""),
    "method not a token": ("GE T", b"/", [], b""),
    "body without its length": ("POST", b"/", [], b"{}"),
    "length that lies": ("POST", b"/", [(b"Content-Length", b"5")], b"{}"),
    "chunked request": ("POST", b"/", [(b"Transfer-Encoding", b"chunked")], b""),
}


@pytest.mark.parametrize("request_", UNSENDABLE.values(), ids=UNSENDABLE.keys())
def test_refuses_to_write_what_would_not_frame_as_meant(
    request_: tuple[str, bytes, list[tuple[bytes, bytes]], bytes],
) -> None:
    with pytest.raises(httpx.LocalProtocolError):
        request_bytes(*request_)
