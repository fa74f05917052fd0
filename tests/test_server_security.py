"""Server security: no request makes the server read a path; --api-key guards every route
that serves data (constant-time); loopback by default; errors never echo the key, the
Authorization header or a filesystem path.

Also home of `serve_process`, the real `refcomplete serve` subprocess used by
test_server_fuzz.py and test_server_load.py (its log goes to a file, never a pipe that
could fill up and stall it).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from fakes import FakeModel
from refcomplete import registry
from refcomplete.server import Endpoint, add_subcommand

KEY = "sk-secret-0123456789abcdef"


# -- a real server process -------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_kib(pid: int) -> int:
    """Resident memory of process `pid`, KiB (Linux: /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


class ServerProcess:
    """`refcomplete serve` in a subprocess: url, pid, its log, its memory."""

    def __init__(self, argv, port, log):
        self.port, self.url, self.log = port, f"http://127.0.0.1:{port}", log
        self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1"})

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError("server exited: " + self.output())
            try:
                if httpx.get(self.url + "/v1/models", timeout=1).status_code in (200, 401):
                    return
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"server on port {self.port} not ready after {timeout}s")
            time.sleep(0.1)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def output(self) -> str:
        self.log.flush()
        return Path(self.log.name).read_text(errors="replace")

    def log_errors(self) -> list[str]:
        """Lines of the server's log that report a fault of ours (tracebacks, 500s)."""
        return [line for line in self.output().splitlines()
                if "Traceback" in line or "Exception in ASGI" in line or "ERROR" in line]

    def rss_kib(self) -> int:
        """Resident memory of the server process (Linux: /proc)."""
        return rss_kib(self.proc.pid)

    def stop(self, timeout: float = 20) -> int:
        """A graceful stop (SIGTERM, as a service manager would): the exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        return self.proc.returncode


@contextlib.contextmanager
def serve_process(*models: str, flags=(), port: int | None = None, timeout: float = 90.0,
                  python=(sys.executable,)):
    """Start `refcomplete serve` on a free port (or `port`) with these --model specs and
    extra flags, run by `python` (an interpreter and its options, before `-m`); yield a
    ServerProcess; always stop it."""
    for attempt in range(2):   # a free port may be taken meanwhile: retry once
        p = port or free_port()
        argv = [*python, "-m", "refcomplete.cli", "serve", "--port", str(p),
                "--log-level", "warning", *[x for m in models for x in ("--model", m)], *flags]
        log = tempfile.NamedTemporaryFile("w+", prefix="refcomplete-serve-", suffix=".log")
        srv = ServerProcess(argv, p, log)
        try:
            srv.wait_ready(timeout)
            break
        except RuntimeError:
            srv.stop()
            log.close()
            if attempt or port:
                raise
    try:
        yield srv
    finally:
        srv.stop()
        log.close()


# -- no request reads a path --------------------------------------------------------------

PATHLIKE = ["/etc/passwd", "../../../../etc/passwd", "..", ".", "./tiny", "tiny/../tiny",
            "~", "~/.cache/huggingface", "gpt2", "openai-community/gpt2", "gpt2-tiny-shakespeare",
            "file:///etc/passwd", "C:\\Windows\\win.ini", "\\\\host\\share", "tiny\x00",
            "/proc/self/environ", "%2e%2e%2fetc%2fpasswd", "tiny/x", " tiny", "TINY",
            "models--openai-community--gpt2", "a" * 5000]


class FileWatch:
    """An audit hook (installed once, per process) recording file opens and directory
    listings made by this thread while `watching`."""

    events = ("open", "os.listdir", "os.scandir", "os.chdir", "pathlib.Path.glob")
    _installed = False
    _local = threading.local()

    @classmethod
    @contextlib.contextmanager
    def watching(cls):
        if not cls._installed:
            sys.addaudithook(cls._hook)
            FileWatch._installed = True
        cls._local.seen = seen = []
        try:
            yield seen
        finally:
            cls._local.seen = None

    @classmethod
    def _hook(cls, event, args):
        seen = getattr(cls._local, "seen", None)
        if seen is not None and event in cls.events:
            seen.append((event, args[0] if args else None))


def _forbid(*_, **__):
    raise AssertionError("a request reached the model registry")


@pytest.fixture
def tiny_endpoint(tiny_dir, monkeypatch):
    endpoint = Endpoint({"tiny": registry.load_model(str(tiny_dir))})
    warm = endpoint.handle("POST", "/v1/completions", {},
                           b'{"model": "tiny", "prompt": "Hi", "max_tokens": 2, "logprobs": 1}')
    assert warm.status == 200     # first request done: lazy imports and caches are warm
    for name in ("resolve", "load_model", "_load", "_hub_snapshot", "list_models"):
        monkeypatch.setattr(registry, name, _forbid)
    return endpoint


@pytest.mark.parametrize("name", PATHLIKE, ids=range(len(PATHLIKE)))
def test_model_names_are_never_paths(tiny_endpoint, tiny_dir, name):
    body = json.dumps({"model": name, "prompt": "Hi", "max_tokens": 2}).encode()
    with FileWatch.watching() as seen:
        r = tiny_endpoint.handle("POST", "/v1/completions", {}, body)
        card = tiny_endpoint.handle("GET", "/v1/models/" + name, {}, b"")
        stream = tiny_endpoint.handle("POST", "/v1/completions", {}, json.dumps(
            {"model": name, "prompt": "Hi", "max_tokens": 2, "stream": True}).encode())
    assert seen == [], f"the request opened {seen}"
    for resp in (r, card, stream):
        assert resp.status == 404 and resp.stream is None
        err = json.loads(resp.body)["error"]
        assert err["code"] == "model_not_found" and str(tiny_dir) not in resp.body.decode()


def test_served_models_are_only_those_named_at_start(tiny_dir):
    """Over a real process: the bundled model exists on disk but was not named: 404."""
    with serve_process(f"tiny={tiny_dir}") as srv:
        assert [m["id"] for m in httpx.get(srv.url + "/v1/models").json()["data"]] == ["tiny"]
        for name in ("gpt2-tiny-shakespeare", str(tiny_dir), "../" * 8 + "etc/passwd"):
            r = httpx.post(srv.url + "/v1/completions",
                           json={"model": name, "prompt": "Hi", "max_tokens": 1})
            assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
        for path in ("/v1/models/..%2f..%2fetc%2fpasswd", "/v1/models/%2fetc%2fpasswd",
                     "/v1/models/../../etc/passwd", "/../../etc/passwd", "//etc/passwd"):
            r = httpx.get(srv.url + path)
            assert r.status_code == 404 and "root:" not in r.text, (path, r.text)
        assert srv.log_errors() == []


# -- the api key ----------------------------------------------------------------------------

ROUTES = [("GET", "/v1/models", b""), ("GET", "/v1/models/tiny", b""),
          ("POST", "/v1/completions", b'{"model": "tiny", "prompt": "Hi", "max_tokens": 1}'),
          ("POST", "/v1/completions/", b'{"model": "tiny", "prompt": "Hi", "max_tokens": 1}'),
          ("GET", "/v1/models/", b"")]
WRONG = [None, "", "Bearer", "Bearer ", f"Basic {KEY}", f"Bearer {KEY[:-1]}",
         f"Bearer {KEY}x", f"Bearer {KEY.upper()}", f"Bearer {KEY} {KEY}", f"Token {KEY}",
         f"Bearer\t{KEY}x", "Bearer é", "Bearer \x00", KEY]


@pytest.fixture(scope="module")
def keyed(tiny_dir):
    return Endpoint({"tiny": registry.load_model(str(tiny_dir))}, api_key=KEY)


@pytest.mark.parametrize("method,path,body", ROUTES, ids=[m + p for m, p, _ in ROUTES])
def test_every_data_route_needs_the_key(keyed, method, path, body):
    for given in WRONG:
        headers = {} if given is None else {"authorization": given}
        r = keyed.handle(method, path, headers, body)
        assert r.status == 401, (given, r.status)
        assert r.headers["www-authenticate"] == "Bearer"
        err = json.loads(r.body)["error"]
        assert err["code"] == "invalid_api_key" and err["type"] == "invalid_request_error"
        assert KEY not in r.body.decode() and KEY[:8] not in r.body.decode()
    for good in (f"Bearer {KEY}", f"bearer {KEY}", f"Bearer  {KEY} "):
        assert keyed.handle(method, path, {"authorization": good}, body).status == 200


def test_401_body_is_the_same_whatever_was_sent(keyed):
    """Nothing of the request (header, body, path) reaches an unauthenticated answer."""
    bodies = set()
    for i, given in enumerate(WRONG[2:]):   # every header given (none: another message)
        body = json.dumps({"model": f"m-{i}", "prompt": given}).encode()
        bodies.add(keyed.handle("POST", "/v1/completions", {"authorization": given}, body).body)
    assert len(bodies) == 1


def test_key_comparison_is_constant_time(keyed, monkeypatch):
    import hmac
    from refcomplete import server
    calls = []
    real = hmac.compare_digest
    monkeypatch.setattr(server.hmac, "compare_digest", lambda a, b: calls.append(1) or real(a, b))
    keyed.handle("GET", "/v1/models", {"authorization": "Bearer nope"}, b"")
    keyed.handle("GET", "/v1/models", {"authorization": f"Bearer {KEY}"}, b"")
    assert len(calls) == 2


def test_the_key_is_checked_before_the_body_is_read(tiny_dir):
    """An unauthenticated client cannot make the server wait for (or buffer) a body."""
    with serve_process(f"tiny={tiny_dir}", flags=["--api-key", KEY]) as srv:
        with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as s:
            s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                      b"Content-Length: 900000\r\n\r\n{")       # the body never comes
            reply = s.recv(4096)
        assert reply.startswith(b"HTTP/1.1 401")
        r = httpx.post(srv.url + "/v1/completions", headers={"Authorization": f"Bearer {KEY}"},
                       json={"model": "tiny", "prompt": "Hi", "max_tokens": 1})
        assert r.status_code == 200
        assert KEY not in srv.output()


# -- no secrets, no paths in errors -----------------------------------------------------------

class _Broken(FakeModel):
    """A model whose forward fails with an OSError naming a server path (a fault of ours)."""

    def __init__(self, after: int):
        def logits(prompt, generated):
            if len(generated) >= after:
                raise FileNotFoundError(2, "No such file", "/srv/secret/weights/model.bin")
            z = np.zeros(50257, np.float32)
            z[11] = 5.0
            return z
        super().__init__(logits, n_ctx=64)


def test_faults_are_500s_that_say_nothing(caplog):
    endpoint = Endpoint({"now": _Broken(0), "later": _Broken(2)}, api_key=KEY)
    auth = {"authorization": f"Bearer {KEY}"}
    r = endpoint.handle("POST", "/v1/completions", auth,
                        b'{"model": "now", "prompt": "Hi", "max_tokens": 4}')
    assert r.status == 500
    err = json.loads(r.body)["error"]
    assert err["type"] == "server_error" and "/srv" not in r.body.decode()
    assert "/srv/secret" in caplog.text        # the detail is in the server's log
    s = endpoint.handle("POST", "/v1/completions", auth,
                        b'{"model": "later", "prompt": "Hi", "max_tokens": 4, "stream": true}')
    frames = b"".join(s.stream)
    assert s.status == 200 and frames.endswith(b"data: [DONE]\n\n")
    assert b'"server_error"' in frames and b"/srv" not in frames and b"FileNotFound" not in frames
    for body in (r.body, frames):
        assert KEY.encode() not in body


def test_error_bodies_name_no_server_path(tiny_dir):
    """Over a real process: every error body is free of the key and of filesystem paths."""
    secrets = [KEY, str(tiny_dir), str(Path(tiny_dir).parent), sys.prefix,
               str(Path(registry.__file__).parent), os.getcwd(), str(Path.home())]
    bad = [b"{", b"[]", b"\xff", b'{"model": "tiny"' + b", " * 10 + b"}",
           json.dumps({"model": "tiny", "prompt": "x", "max_tokens": 10**6}).encode(),
           json.dumps({"model": "tiny", "prompt": [70000]}).encode(),
           json.dumps({"model": "tiny", "prompt": "x", "nope": 1}).encode(),
           b"[" * 10000, b'{"model": "tiny", "prompt": "' + b"a" * 1_100_000 + b'"}']
    with serve_process(f"tiny={tiny_dir}", flags=["--api-key", KEY]) as srv, httpx.Client(
            base_url=srv.url, timeout=30) as c:
        answers = [c.post("/v1/completions", content=b, headers={"Authorization": f"Bearer {KEY}"})
                   for b in bad]
        answers += [c.post("/v1/completions", content=bad[-2],
                           headers={"Authorization": f"Bearer {KEY}x"}),
                    c.get("/v1/nothing", headers={"Authorization": f"Bearer {KEY}"}),
                    c.request("DELETE", "/v1/models", headers={"Authorization": f"Bearer {KEY}"})]
        for r in answers:
            assert 400 <= r.status_code < 500, r.text[:200]
            assert set(r.json()["error"]) == {"message", "type", "param", "code"}
            for secret in secrets:
                assert secret not in r.text, (secret, r.text[:300])
        # a model name that is a path is the client's own text: it gets a 404, nothing more
        r = c.post("/v1/completions", headers={"Authorization": f"Bearer {KEY}"},
                   json={"model": str(Path(tiny_dir) / "config.json"), "prompt": "x"})
        assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
        assert srv.log_errors() == [] and KEY not in srv.output()


# -- where it listens --------------------------------------------------------------------------

def test_serve_binds_loopback_unless_told():
    import argparse
    sub = argparse.ArgumentParser().add_subparsers()
    add_subcommand(sub)
    args = sub.choices["serve"].parse_args([])
    assert args.host == "127.0.0.1"


@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="needs Linux /proc")
def test_the_process_listens_on_loopback_only(tiny_dir):
    with serve_process(f"tiny={tiny_dir}") as srv:
        listening = [line.split() for line in Path("/proc/net/tcp").read_text().splitlines()[1:]]
        mine = [f for f in listening if int(f[1].split(":")[1], 16) == srv.port and f[3] == "0A"]
        assert mine and all(f[1].split(":")[0] == "0100007F" for f in mine), mine


def test_a_public_address_without_a_key_is_warned_about(monkeypatch, capsys):
    """Checked without binding anything: the tests listen on 127.0.0.1 only."""
    import argparse
    from refcomplete import server
    monkeypatch.setattr(server, "serve", lambda *a, **k: None)
    sub = argparse.ArgumentParser().add_subparsers()
    add_subcommand(sub)
    for argv, warned in ((["--host", "0.0.0.0"], True), (["--host", "0.0.0.0", "--api-key", KEY],
                         False), ([], False), (["--host", "::1"], False)):
        args = sub.choices["serve"].parse_args(argv)
        assert args.handler(args) == 0
        err = capsys.readouterr().err
        assert ("without --api-key" in err) == warned and KEY not in err


# -- the Host allow-list (DNS rebinding) --------------------------------------------------------

GOOD_HOSTS = ["127.0.0.1", "127.0.0.1:8000", "localhost", "LOCALHOST:1", "localhost.", "[::1]:80",
              "127.0.0.2"]
BAD_HOSTS = ["evil.example", "evil.example:8000", "localhost.evil.example", "127.0.0.1.nip.io",
             "10.0.0.1", "[fe80::1]", "", "x:y", "[::1", "local host"]


@pytest.mark.parametrize("key", [None, KEY], ids=["open", "keyed"])
def test_other_hosts_get_421_whatever_the_key(tiny_dir, key):
    from refcomplete.guards import HostPolicy
    endpoint = Endpoint({"tiny": registry.load_model(str(tiny_dir))}, api_key=key,
                        hosts=HostPolicy.for_server("127.0.0.1"))
    auth = {"authorization": f"Bearer {KEY}"}
    routes = ROUTES + [("GET", "/tokenizer_info", b""), ("POST", "/tokenize", b'{"prompt": "a"}'),
                       ("GET", "/nowhere", b""), ("DELETE", "/v1/models", b"")]
    for method, path, body in routes:
        for host in BAD_HOSTS:
            for headers in ({"host": host}, {"host": host, **auth}):
                r = endpoint.handle(method, path, headers, body)
                assert r.status == 421, (method, path, host, r.status)
                err = json.loads(r.body)["error"]
                assert err["code"] == "host_not_allowed" and err["type"] == "invalid_request_error"
                assert KEY not in r.body.decode()
    for host in GOOD_HOSTS + [None]:     # no Host at all: HTTP/1.0, never a browser
        headers = {} if host is None else {"host": host}
        assert endpoint.handle("GET", "/v1/models", {**headers, **auth}, b"").status == 200, host
        assert endpoint.handle("GET", "/v1/models", headers, b"").status == (401 if key else 200)


def test_host_policy_names():
    from refcomplete.guards import HostPolicy
    p = HostPolicy.for_server("192.168.1.5", ["box.lan", "Other.Example.:9000"])
    assert all(p.allows(h) for h in ("box.lan", "BOX.LAN:8000", "other.example", "192.168.1.5:80",
                                     "localhost", "127.9.9.9", "[::1]"))
    assert not any(p.allows(h) for h in ("evil.example", "192.168.1.6", "box.lan.evil.example"))
    anywhere = HostPolicy.for_server("0.0.0.0")       # bound to all: any IP literal, no names
    assert anywhere.allows("10.1.2.3:8000") and anywhere.allows("[2001:db8::1]")
    assert not anywhere.allows("evil.example")
    assert HostPolicy.for_server("::").allows("10.1.2.3")
    assert HostPolicy.for_server("127.0.0.1", ["*"]).allows("evil.example")


def _raw(port: int, request: bytes) -> bytes:
    """Send one raw request; the whole reply (the server closes or 10 s pass)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(request)
        chunks = []
        while True:
            try:
                part = s.recv(65536)
            except socket.timeout:
                break
            if not part:
                break
            chunks.append(part)
            head, _, body = b"".join(chunks).partition(b"\r\n\r\n")
            length = [int(l.split(b":")[1]) for l in head.split(b"\r\n")
                      if l.lower().startswith(b"content-length:")]
            if length and len(body) >= length[0]:
                break
    return b"".join(chunks)


def test_a_real_server_answers_only_its_hosts(tiny_dir):
    for flags in ([], ["--api-key", KEY]):
        with serve_process(f"tiny={tiny_dir}", flags=["--allowed-host", "box.lan",
                                                      "--allowed-host", "other.lan", *flags]) as srv:
            auth = f"Authorization: Bearer {KEY}\r\n".encode() if flags else b""
            for host, status in (("evil.example", 421), (f"evil.example:{srv.port}", 421),
                                 (f"localhost:{srv.port}", 200), (f"127.0.0.1:{srv.port}", 200),
                                 ("box.lan", 200), ("other.lan:1", 200), ("lan", 421)):
                for extra in (auth, b""):
                    reply = _raw(srv.port, b"GET /v1/models HTTP/1.1\r\nHost: " + host.encode()
                                 + b"\r\n" + extra + b"\r\n")
                    want = 401 if status == 200 and flags and not extra else status
                    assert reply.startswith(b"HTTP/1.1 %d " % want), (host, flags, reply[:200])
                    if want == 421:
                        head, _, body = reply.partition(b"\r\n\r\n")
                        assert b"application/json" in head
                        assert json.loads(body)["error"]["code"] == "host_not_allowed"
            # a POST from a rebinding page is refused before its body is read
            reply = _raw(srv.port, b"POST /v1/completions HTTP/1.1\r\nHost: evil.example\r\n"
                         b"Content-Length: 900000\r\n\r\n{")
            assert reply.startswith(b"HTTP/1.1 421 ")
            assert srv.log_errors() == []


def test_allowed_host_flag_reaches_serve(monkeypatch):
    import argparse
    from refcomplete import server
    seen = {}
    monkeypatch.setattr(server, "serve", lambda *a, **k: seen.update(args=a))
    sub = argparse.ArgumentParser().add_subparsers()
    add_subcommand(sub)
    args = sub.choices["serve"].parse_args(["--allowed-host", "a.lan", "--allowed-host", "b.lan"])
    assert args.handler(args) == 0 and seen["args"][-1] == ("a.lan", "b.lan")
    args = sub.choices["serve"].parse_args([])
    assert args.handler(args) == 0 and seen["args"][-1] == ()


# -- an over-long Content-Length --------------------------------------------------------------

def test_any_over_long_content_length_is_an_openai_413(tiny_dir):
    """h11 refuses more than 20 digits as malformed (uvicorn's plain-text 400); the server
    answers every declared length over --max-body, 10^20 included, with its own 413."""
    from refcomplete.server import too_large
    expected = json.loads(too_large(4096).body)
    with serve_process(f"tiny={tiny_dir}", flags=["--max-body", "4096", "--api-key", KEY]) as srv:
        auth = f"Authorization: Bearer {KEY}\r\n".encode()
        for declared in (b"4097", b"99999999999999999999", b"100000000000000000000",
                         b"1" + b"0" * 60, b" 1" + b"0" * 500 + b" "):
            for name in (b"Content-Length", b"content-length", b"CONTENT-LENGTH"):
                reply = _raw(srv.port, b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                             + auth + name + b":" + declared + b"\r\n\r\n{}")
                head, _, body = reply.partition(b"\r\n\r\n")
                assert head.startswith(b"HTTP/1.1 413 "), (declared[:30], reply[:300])
                assert b"content-type: application/json" in head.lower()
                assert json.loads(body) == expected
        # malformed lengths are still uvicorn's 400; the server serves on
        for declared in (b"abc", b"-1", b"1e30", b"12 34"):
            reply = _raw(srv.port, b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                         b"Content-Length: " + declared + b"\r\n\r\n{}")
            assert reply.startswith(b"HTTP/1.1 400 "), (declared, reply[:200])
        r = httpx.post(srv.url + "/v1/completions", headers={"Authorization": f"Bearer {KEY}"},
                       json={"model": "tiny", "prompt": "Hi", "max_tokens": 1}, timeout=30)
        assert r.status_code == 200
        assert srv.log_errors() == []
