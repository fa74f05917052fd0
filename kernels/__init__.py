"""The GPT-2 kernels and our elementary functions, installed as `refcomplete.kernels`.

- fmath.py: our float64 exp, log and sum (pure NumPy, the spec; SEMANTICS 11);
  fmath_numba.py: their compiled twins, the same bits.
- gpt2_numpy.py: the GPT-2 kernels as strict NumPy (the "numpy" backend, the spec);
  gpt2.py: the same kernels compiled with Numba (the "numba" backend, the default).
tests/test_kernels.py and test_fmath.py pin each pair bit for bit, also under
NUMBA_DISABLE_JIT=1. Only fmath_numba.py and gpt2.py import numba, and only
refcomplete.runtime imports them, lazily: `import refcomplete` stays light.
"""


def require_package_name(name: str) -> None:
    """Refuse a compiled kernel module imported as `kernels.<it>` (from the repository root):
    Numba would cache its functions under that module name, and every later
    refcomplete.kernels import outside the root would fail to load them
    (ModuleNotFoundError: kernels). The package itself stays importable as `kernels`:
    transformers probes for a package of that name."""
    if not name.startswith("refcomplete.kernels."):
        raise ImportError(f"import these kernels as refcomplete.kernels, not as {name!r}")
