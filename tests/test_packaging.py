"""Packaging metadata: the SPDX license string, and a build that warns nothing about it.

Slow-marked: the build fetches its own setuptools (build isolation), as `make demo` does.
"""

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_license_is_an_spdx_string():
    tomllib = pytest.importorskip("tomllib")   # Python 3.11+
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert meta["project"]["license"] == "MIT"
    assert "setuptools>=77" in meta["build-system"]["requires"]   # SPDX strings need 77


@pytest.mark.slow
def test_the_build_prints_no_license_deprecation(tmp_path):
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w",
                        str(tmp_path), str(ROOT)], capture_output=True, text=True, cwd=tmp_path,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    output = r.stdout + r.stderr
    assert "project.license" not in output and "License classifiers" not in output, output
    wheel = next(tmp_path.glob("refcomplete-*.whl"))
    with zipfile.ZipFile(wheel) as z:
        metadata = z.read("refcomplete-0.1.0.dist-info/METADATA").decode()
    assert "License-Expression: MIT" in metadata.splitlines()
