#!/usr/bin/env bash
# lm-eval 0.4.13 with its api extra and what its `hf` backend needs, in a venv of its own
# (make peers). torch is installed first and pinned: torch==2.13.0 (a CPU build here; an
# unpinned torch would pull a multi-GB CUDA build).
# Usage: tests/peers/build_lm_eval.sh VENV PYTHON
set -euo pipefail
venv=${1:?venv}; python=${2:-python3}
here=$(cd "$(dirname "$0")" && pwd)
rm -rf "$venv"
"$python" -m venv "$venv"
log="$venv/install.log"
start=$(date +%s)
echo "installing torch==2.13.0 and lm-eval==0.4.13 into $venv (log: $log)"
if ! {
    "$venv/bin/python" -m pip install --upgrade 'pip>=24' &&
    timeout 900 "$venv/bin/python" -m pip install torch==2.13.0 &&
    timeout 900 "$venv/bin/python" -m pip install -c "$here/lm-eval-constraints.txt" \
        'lm-eval[api]==0.4.13' 'transformers>=5.0,<5.25' 'accelerate>=0.26'
} >"$log" 2>&1; then
    echo "lm-eval install FAILED after $(( $(date +%s) - start )) s; last 40 lines of $log:" >&2
    tail -n 40 "$log" >&2
    exit 1
fi
"$venv/bin/python" -c 'import importlib.metadata as m; print(*(f"{p} {m.version(p)}" for p in ("lm_eval", "torch", "transformers", "accelerate", "datasets")), sep=", ")'
echo "installed in $(( $(date +%s) - start )) s"
