"""bench/ab_server.py, the A/B of two versions of `serve`: its launcher imports all of the
other tree's code, kernels included (an earlier A/B put a bare checkout on PYTHONPATH,
where refcomplete.kernels, mapped by pyproject.toml, came from the installed tree), and
its sign test."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("ab_server", ROOT / "bench" / "ab_server.py")
ab = importlib.util.module_from_spec(spec)
spec.loader.exec_module(ab)


def test_sign_test():
    assert ab.sign_test(10, 10) == pytest.approx(2 / 1024)
    assert ab.sign_test(0, 10) == pytest.approx(2 / 1024)
    assert ab.sign_test(8, 10) == pytest.approx(2 * 56 / 1024)
    assert ab.sign_test(5, 10) == 1.0
    assert ab.sign_test(1, 1) == 1.0


def test_the_launcher_imports_the_other_tree_not_the_installed_one(tmp_path):
    tree = tmp_path / "a"
    shutil.copytree(ROOT / "refcomplete", tree / "refcomplete",
                    ignore=shutil.ignore_patterns("__pycache__"))
    for top in ("kernels", "weights"):
        (tree / top).symlink_to(ROOT / top)
    (tree / "tests").mkdir()
    (tree / "tests" / "golden").symlink_to(ROOT / "tests" / "golden")
    for link, target in ab.LINKS.items():
        (tree / link).symlink_to(target)
    marker = "# a line only this tree has"
    init = tree / "refcomplete" / "__init__.py"
    init.write_text(init.read_text() + f"\nTREE_MARKER = {marker!r}\n")
    probe = ("import refcomplete, refcomplete.kernels, refcomplete.weights; "
             "print(refcomplete.__file__); print(getattr(refcomplete, 'TREE_MARKER', None))")
    (tree / "probe.py").write_text(probe)              # found on the tree, as refcomplete is
    run = subprocess.run([sys.executable, str(ROOT / "bench" / "ab_server.py"), "--launch",
                          str(tree), "-m", "probe"], capture_output=True, text=True,
                         cwd=tmp_path, timeout=120)
    assert run.returncode == 0, run.stderr
    where, seen = run.stdout.splitlines()[-2:]
    assert where == str(init) and seen == marker
    assert str(tree) in ab.imported_from(run.stderr)
