"""`make peers`, part 1: `refcomplete compare` against llama-cpp-python's server.

Exports the bundled model to GGUF (`refcomplete export`), serves it with
llama-cpp-python 0.3.36 (built by tests/peers/build_llama_cpp.sh into .venv-peers) on
127.0.0.1 on a free port, runs compare over the bundled suite with every dialect waived,
writes the report to build/peers/, and checks its set of findings against the committed
expectation tests/peers/llama-cpp-python-0.3.36.json (check_findings.py). The server is
always stopped.

    .venv/bin/python tests/peers/llama_cpp_peer.py            # check
    .venv/bin/python tests/peers/llama_cpp_peer.py --update   # re-record the expectation
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

from peerlib import OUT, ROOT, finish, free_port, log, run, server, venv_bin

VERSION = "0.3.36"
EXPECT = ROOT / "tests" / "peers" / f"llama-cpp-python-{VERSION}.json"
GGUF = "gpt2-tiny-shakespeare.gguf"
# llama.cpp's defaults are not OpenAI's (repeat_penalty 1.1, top_k 40, min_p 0.05)
EXTRA = '{"repeat_penalty": 1.0, "top_k": 0, "min_p": 0}'


def compare_has_sampling(refc: str) -> bool:
    out = subprocess.run([refc, "compare", "--help"], capture_output=True, text=True, timeout=60)
    return "--sampling" in out.stdout


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--update", action="store_true", help="write the expectation from this run")
    args = ap.parse_args()
    refc = venv_bin(".venv", "refcomplete")
    py = venv_bin(".venv-peers", "python")
    OUT.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()

    gguf = OUT / GGUF
    gguf.unlink(missing_ok=True)
    if run([refc, "export", "--format", "gguf", "--model", "gpt2-tiny-shakespeare", "--out",
            str(gguf)], timeout=300).returncode != 0:
        sys.exit("refcomplete export failed")

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    sampling = compare_has_sampling(refc)
    cmd = [refc, "compare", "--base-url", base, "--model", GGUF, "--suite", "bundled",
           "--extra-body", EXTRA, "--waive-all-dialects"]
    if sampling:
        cmd.append("--sampling")
    else:
        log("`refcomplete compare --help` offers no --sampling: comparing without it")
    report = OUT / f"llama-cpp-python-{VERSION}.report.json"
    report.unlink(missing_ok=True)
    cmd += ["--report", str(report)]

    # cwd OUT: the server knows the model as GGUF, the name compare sends
    srv = [py, "-m", "llama_cpp.server", "--model", GGUF, "--n_ctx", "512",
           "--host", "127.0.0.1", "--port", str(port)]
    log(f"starting llama-cpp-python {VERSION} on {base}")
    with server(srv, f"{base}/v1/models", OUT / "llama-cpp-server.log", timeout=120, cwd=OUT):
        log(f"server ready after {time.monotonic() - t0:.0f} s")
        rc = run(cmd, timeout=900).returncode
    meta = {"peer": f"llama-cpp-python[server]=={VERSION}", "sampling": sampling,
            "compare": ["refcomplete", "compare", "--model", GGUF, "--suite", "bundled",
                        "--extra-body", EXTRA, "--waive-all-dialects"]
            + (["--sampling"] if sampling else [])}
    return finish("llama-cpp-python", rc, report, OUT / "llama-cpp-server.log", meta, EXPECT,
                  args.update, OUT / f"llama-cpp-python-{VERSION}.findings.md", t0)


if __name__ == "__main__":
    sys.exit(main())
