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


def test_the_compiled_kernels_refuse_to_be_imported_from_a_top_level_package():
    """From the repository root `import kernels` would find kernels/; Numba would then cache
    the compiled kernels under that name, and refcomplete.kernels, imported anywhere else,
    would fail to load them (ModuleNotFoundError: kernels). So it is refused, with the fix."""
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", "import kernels.fmath_numba"], cwd=root,
                         capture_output=True, text=True)
    assert out.returncode != 0 and "import these kernels as refcomplete.kernels" in out.stderr
    probe = subprocess.run([sys.executable, "-c", "import kernels"], cwd=root,   # transformers'
                           capture_output=True, text=True)                       # package probe
    assert probe.returncode == 0, probe.stderr
    ok = subprocess.run([sys.executable, "-c", "import refcomplete.kernels.fmath"], cwd=root,
                        capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
