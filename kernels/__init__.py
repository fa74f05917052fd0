"""Numba kernels for the GPT-2 decode step, installed as `refcomplete.kernels`.

Each kernel in gpt2.py has a NumPy twin (same name + `_ref`) that is its spec;
tests/test_kernels.py pins them together, also under NUMBA_DISABLE_JIT=1.
Importing this package imports numba: only refcomplete.runtime does, lazily.
"""
