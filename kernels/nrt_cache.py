"""Numba's runtime module (NRT), cached on disk like our kernels.

Knows: how Numba builds its runtime library. Does not know: any kernel's arithmetic.

Numba loads our kernels from its on-disk cache, but before the first one it JIT-compiles
a small module of its own (reference counting and atomics, `nrtdynmod`) in every new
process. That one compile is what brings LLVM's optimiser and code generator into
memory: 20 MB of resident pages in a process that then never compiles again (P6 in
docs/benchmarks.md), and startup time. `install()` makes Numba take that module from a
file beside our kernels' cache, keyed like Numba's own entries (Numba and llvmlite
versions, target triple, CPU name and features), and write it there the first time.
The module holds no arithmetic of ours, so no bit can change. Anything unexpected (a
Numba without these internals, an unreadable or stale file) falls back to Numba's own
compile.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import sys
import tempfile
from pathlib import Path

import llvmlite
import numba
from numba.core import caching
from numba.core.runtime import nrtdynmod

_numba_compile = nrtdynmod.compile_nrt_functions


def install() -> None:
    """Route Numba's runtime compile through the cache (idempotent). Call it before the
    first kernel loads."""
    if hasattr(nrtdynmod, "create_nrt_module"):
        nrtdynmod.compile_nrt_functions = _cached_compile


def cache_file(ctx) -> Path:
    """Where this process's runtime module lives: one file per Numba build and target."""
    key = repr((numba.__version__, llvmlite.__version__, sys.version_info[:2], ctx.codegen().magic_tuple()))
    folder = Path(caching.FunctionCache(install)._cache_path)   # where Numba caches this folder's kernels
    return folder / f"numba-nrt-{hashlib.sha256(key.encode()).hexdigest()[:16]}.nbo"


def _cached_compile(ctx):
    try:
        path = cache_file(ctx)
    except Exception:                       # no cache folder Numba can write: its own way
        return _numba_compile(ctx)
    try:
        return ctx.codegen().unserialize_library(pickle.loads(path.read_bytes()))
    except Exception:                       # absent, truncated or from another build
        pass
    ir_module, library = nrtdynmod.create_nrt_module(ctx)   # compile_nrt_functions' own steps,
    library.enable_object_caching()                        # keeping the machine code
    library.add_ir_module(ir_module)
    library.finalize()
    data = pickle.dumps(library.serialize_using_object_code())
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    except OSError:
        return library                      # a read-only cache: compiled, just not saved
    try:
        os.fchmod(fd, 0o644)                # readable by every user of a shared install
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)               # atomic: concurrent first runs never see half a file
    except OSError:
        os.unlink(tmp)
    return library
