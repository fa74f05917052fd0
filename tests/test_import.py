"""`import refcomplete` stays light: no numba, no torch, nothing compiled."""

import subprocess
import sys


def test_import_does_not_load_numba_or_torch():
    code = ("import sys, refcomplete; "
            "print(sorted(m for m in ('numba', 'llvmlite', 'torch', 'transformers', 'refcomplete.kernels.gpt2', 'refcomplete.kernels.fmath_numba') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_public_api():
    import refcomplete

    for name in ("create", "CompletionError", "load_model", "list_models", "sampling", "rng", "__version__"):
        assert hasattr(refcomplete, name), name
