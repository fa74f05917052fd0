#!/usr/bin/env bash
# Build llama-cpp-python[server] from its sdist into a venv of its own (make peers).
# Usage: tests/peers/build_llama_cpp.sh VENV PYTHON
# The full pip/cmake log goes to VENV/build.log; on failure its tail is shown.
set -euo pipefail
venv=${1:?venv}; python=${2:-python3}
here=$(cd "$(dirname "$0")" && pwd)
jobs=$(nproc 2>/dev/null || echo 2)
rm -rf "$venv"
"$python" -m venv "$venv"
log="$venv/build.log"
start=$(date +%s)
echo "building llama-cpp-python[server] from the sdist into $venv (log: $log; about 6 minutes on 2 cores)"
if ! {
    "$venv/bin/python" -m pip install --upgrade 'pip>=24' &&
    CMAKE_ARGS="-DGGML_NATIVE=ON" \
    MAKEFLAGS="-j$jobs" CMAKE_BUILD_PARALLEL_LEVEL="$jobs" \
    timeout 1500 "$venv/bin/python" -m pip install -v --no-binary llama-cpp-python \
        -c "$here/llama-cpp-constraints.txt" \
        'llama-cpp-python[server]==0.3.36' 'starlette-context<0.4'
} >"$log" 2>&1; then
    echo "llama-cpp-python build FAILED after $(( $(date +%s) - start )) s; last 60 lines of $log:" >&2
    tail -n 60 "$log" >&2
    exit 1
fi
"$venv/bin/python" -c 'import llama_cpp, llama_cpp.server.app; print("llama_cpp", llama_cpp.__version__)'
echo "built in $(( $(date +%s) - start )) s"
