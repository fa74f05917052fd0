"""Shared by the `make peers` scripts: a free loopback port, a server process that is
always stopped, and a bounded wait until it answers. Standard library only, so it runs
under any of the peer venvs."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "build" / "peers"          # build/ is gitignored


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def log(msg: str) -> None:
    print(f"[peers {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def tail(path: Path, n: int = 40) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return "(no log)"
    return "\n".join(lines[-n:])


@contextlib.contextmanager
def server(cmd: list, ready_url: str, log_path: Path, timeout: float, cwd=None, env=None):
    """Start `cmd` (its output to log_path), wait at most `timeout` s until GET ready_url
    answers 200, yield the process; always stop it (SIGTERM, then SIGKILL after 10 s)."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=cwd,
                                env={**os.environ, **(env or {})}, start_new_session=True)
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise SystemExit(f"server exited with status {proc.returncode} before it was "
                                 f"ready: {' '.join(map(str, cmd))}\n--- {log_path}:\n{tail(log_path)}")
            try:
                with urllib.request.urlopen(ready_url, timeout=2) as r:
                    if r.status == 200:
                        break
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() > deadline:
                raise SystemExit(f"server not ready after {timeout:.0f} s: {ready_url}\n"
                                 f"--- {log_path}:\n{tail(log_path)}")
            time.sleep(0.5)
        yield proc
    finally:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(5)


def run(cmd: list, timeout: float, **kw) -> subprocess.CompletedProcess:
    """Run a command with a bound on its time; its output goes to ours."""
    log("$ " + " ".join(map(str, cmd)))
    try:
        return subprocess.run(cmd, timeout=timeout, **kw)
    except subprocess.TimeoutExpired:
        raise SystemExit(f"timed out after {timeout:.0f} s: {' '.join(map(str, cmd))}")


def venv_bin(venv: str, name: str) -> str:
    path = ROOT / venv / "bin" / name
    if not path.exists():
        sys.exit(f"{path} is missing: run `make peers` (it builds {venv})")
    return str(path)


def finish(peer: str, rc: int, report: Path, server_log: Path, meta: dict, expect: Path,
           update: bool, table: Path, t0: float) -> int:
    """The end of a compare peer: compare's exit status and report checked (exit with the
    server log's path if it could not run), then its findings held against the committed
    expectation (check_findings.py; --update writes it). Returns the exit status."""
    import check_findings

    log(f"compare exit status {rc} (1: some case fails, as expected against this server)")
    if rc not in (0, 1) or not report.is_file():
        sys.exit(f"compare could not be run (exit status {rc}); server log: {server_log}")
    status = check_findings.main_with(report, expect, update=update, meta=meta, table_path=table)
    log(f"{peer} peer done in {time.monotonic() - t0:.0f} s")
    return status
