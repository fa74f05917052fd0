"""What machine a benchmark ran on: the CPU's SIMD flags (AVX2, FMA, AVX-512), its model
name and core count, Numba's compile target. Every benchmark prints `header()` first.

Knows: /proc/cpuinfo and the environment. Does not know: any measurement.
"""

from __future__ import annotations

import os
import platform
import re
from pathlib import Path

FLAGS = ("sse4_2", "avx", "avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni")


def cpu() -> dict:
    """{"model", "cores", "simd"}: the CPU model name, logical cores, and which of FLAGS it has."""
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = re.search(r"^model name\s*:\s*(.*)$", text, re.M)
    flags = re.search(r"^flags\s*:(.*)$", text, re.M)
    have = set(flags.group(1).split()) if flags else set()
    return {"model": model.group(1).strip() if model else platform.machine(), "cores": os.cpu_count(),
            "simd": [f for f in FLAGS if f in have]}


def header() -> str:
    """One line: CPU, SIMD flags, and any setting that changes code generation."""
    c = cpu()
    kind = "AVX-512" if "avx512f" in c["simd"] else "AVX2" if "avx2" in c["simd"] else "no AVX2"
    env = {k: os.environ[k] for k in ("NUMBA_CPU_NAME", "NUMBA_CPU_FEATURES", "NPY_DISABLE_CPU_FEATURES",
                                      "ATEN_CPU_CAPABILITY", "OPENBLAS_CORETYPE", "NUMBA_NUM_THREADS")
           if k in os.environ}
    return (f"machine: {c['model']}, {c['cores']} logical CPUs, {kind} ({' '.join(c['simd'])})"
            + (f"; settings {env}" if env else ""))
