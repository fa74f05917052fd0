"""Defences of `refcomplete serve` that sit below request semantics.

Knows: the Host header (a DNS-rebinding guard), uvicorn's h11 protocol (a request head
that h11 refuses for an over-long Content-Length), and the model interface's forwards (a
client that left stops its generation). Does not know: routes, bodies, completion rules
(server.py).

    policy = HostPolicy.for_server("127.0.0.1", extra=["box.lan"])
    policy.allows("localhost:8000"), policy.allows("evil.example")     # True, False
    uvicorn.run(app, http=h11_protocol(status=413, headers=..., body=...))

Host allow-list. A web page that the local user visits can rebind its own domain name
to 127.0.0.1 and then, being same-origin with it, call the server and read the answers;
its requests still carry `Host: its-domain`. So, as Jupyter does, the server answers only
Hosts it knows: `localhost`, loopback IP literals, the address it is bound to, and each
`--allowed-host` (`*`: any). Bound to every address (0.0.0.0, ::), any IP literal is
answered too: a rebinding attack needs a name. A request without Host (HTTP/1.0) is
answered: browsers always send one. The port is not compared.

h11 refuses a Content-Length of more than 20 digits as malformed, and uvicorn answers it
with a plain-text 400 before the app sees the request; `h11_protocol` answers it with
the app's own 413 instead, as for any other declared length over `--max-body`.

A non-streamed completion's client may leave while it is computed; the transport then
sets an event, and `Watched(model, gone)` raises ClientGone before the next forward
(prefill or step), so the generation stops within one step (streams stop when their
iterator is closed instead).
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import Iterable

WILDCARD_BINDS = frozenset({"0.0.0.0", "::", ""})
# A Content-Length header h11 refuses for its length alone: digits only, over 20 of them.
LONG_CONTENT_LENGTH = re.compile(rb"(?im)^content-length[ \t]*:[ \t]*[0-9]{21,}[ \t]*\r?$")
HEAD_KEPT = 1 << 16   # bytes of a request head kept to explain an h11 refusal (h11: 16 KiB)


def hostname(host: str) -> str | None:
    """The name of a Host header value or of an address, lower-cased, without port, trailing
    dot or IPv6 brackets: "LocalHost.:8000" -> "localhost", "[::1]:80" -> "::1"; None when
    it is not a host at all."""
    host = host.strip().lower()
    if host.startswith("["):
        name, sep, port = host[1:].partition("]")
        if not sep or port and not (port[0] == ":" and port[1:].isdigit()):
            return None
    else:
        try:
            return str(ipaddress.ip_address(host))     # a bare IPv6 address (a bind, a flag)
        except ValueError:
            pass
        name, _, port = host.partition(":")
        if port and not (port.isascii() and port.isdigit()):
            return None
    name = name.rstrip(".")
    return name or None


@dataclass(frozen=True)
class HostPolicy:
    """Which Host headers the server answers (see the module docstring)."""

    names: frozenset = frozenset({"localhost"})
    any_ip: bool = False      # bound to every address: any IP literal
    any_host: bool = False    # `--allowed-host '*'`: no check

    @classmethod
    def for_server(cls, bind: str, extra: Iterable[str] = ()) -> "HostPolicy":
        extra = list(extra)
        names = {hostname(h) for h in [bind, *extra] if h != "*"} - {None}
        return cls(frozenset({"localhost", *names}), any_ip=bind.strip("[]") in WILDCARD_BINDS,
                   any_host="*" in extra)

    def allows(self, host: str | None) -> bool:
        if host is None or self.any_host:
            return True
        name = hostname(host)
        if name is None:
            return False
        if name in self.names:
            return True
        try:
            ip = ipaddress.ip_address(name)
        except ValueError:
            return False
        return ip.is_loopback or self.any_ip


def h11_protocol(status: int, headers: dict, body: bytes):
    """uvicorn's h11 protocol class, answering a request head that h11 refused for an
    over-long Content-Length with (status, headers, body) instead of a plain-text 400.
    Any other malformed request still gets uvicorn's own answer."""
    import h11
    from uvicorn.protocols.http.h11_impl import STATUS_PHRASES, H11Protocol

    raw = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()]
    raw += [(b"content-length", str(len(body)).encode()), (b"connection", b"close")]

    class Protocol(H11Protocol):
        _head = b""   # the bytes of the request head being received (for send_400_response)

        def data_received(self, data: bytes) -> None:
            idle = self.conn.their_state is h11.IDLE
            self._head = (self._head + data)[:HEAD_KEPT] if idle else b""
            super().data_received(data)

        def on_response_complete(self) -> None:
            self._head = b""
            super().on_response_complete()

        def send_400_response(self, msg: str) -> None:
            if not LONG_CONTENT_LENGTH.search(self._head):
                return super().send_400_response(msg)
            self._head = b""
            response = h11.Response(status_code=status, headers=raw, reason=STATUS_PHRASES[status])
            for event in (response, h11.Data(data=body), h11.EndOfMessage()):
                self.transport.write(self.conn.send(event))
            self.transport.close()

    return Protocol


class ClientGone(Exception):
    """A non-streamed request's client left: its generation stops at the next forward."""


class Watched:
    """A model (refcomplete.lm.LanguageModel) whose sessions check `gone.is_set()` before
    each forward and raise ClientGone once it is; everything else is the model's own."""

    def __init__(self, model, gone):
        self._model, self._gone = model, gone

    def __getattr__(self, name):
        return getattr(self._model, name)

    def _check(self) -> None:
        if self._gone.is_set():
            raise ClientGone

    def session(self, prompt, rows: int, max_new_tokens: int):
        self._check()
        return _WatchedSession(self._model.session(prompt, rows, max_new_tokens), self._check)


class _WatchedSession:
    def __init__(self, session, check):
        self._session, self._check = session, check

    def prefill(self, all_positions: bool = False):
        self._check()
        return self._session.prefill(all_positions)

    def step(self, rows, tokens):
        self._check()
        return self._session.step(rows, tokens)
