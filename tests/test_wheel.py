"""The built wheel works on its own: fresh venv, run from outside the repo, bundled data inside.

Slow (builds a wheel and installs its dependencies into a new virtual environment).
"""

import json
import subprocess
import sys
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = r"""
import importlib.util, json, sys
import refcomplete
assert importlib.util.find_spec("kernels") is None, "kernels must not be a top-level package"
from refcomplete._paths import weights_dir
out = {"weights": str(weights_dir()), "file": refcomplete.__file__, "models": refcomplete.list_models()}
from refcomplete.compare import bundled_suite
from refcomplete.golden import load_suite
out["suite"], out["suite_cases"] = str(bundled_suite()), len(load_suite(bundled_suite())[1])
if hasattr(refcomplete, "create"):
    r = refcomplete.create(model="gpt2-tiny-shakespeare", prompt="ROMEO:", max_tokens=8, temperature=0)
    out["text"] = r["choices"][0]["text"]
    out["usage"] = r["usage"]
print(json.dumps(out))
"""


@pytest.mark.slow
def test_wheel_installs_and_completes_outside_the_repo(tmp_path):
    dist = tmp_path / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(dist), str(ROOT)],
                   check=True, cwd=tmp_path)
    wheel = next(dist.glob("refcomplete-*.whl"))
    import zipfile

    names = zipfile.ZipFile(wheel).namelist()
    assert "refcomplete/weights/r50k_base.tiktoken" in names
    assert "refcomplete/kernels/gpt2.py" in names
    assert not any(n.startswith("kernels/") for n in names)
    assert any(n.startswith("refcomplete/weights/gpt2-tiny-shakespeare/model.safetensors") for n in names)
    assert "refcomplete/golden_suite/manifest.json" in names       # compare's default suite
    assert "refcomplete/golden_suite/sampling.json" in names       # and its sampling cases
    assert not any(n.startswith("tests/") for n in names)

    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    py = env_dir / "bin" / "python"
    subprocess.run([py, "-m", "pip", "install", "-q", str(wheel)], check=True, cwd=tmp_path)
    work = tmp_path / "elsewhere"
    work.mkdir()
    r = subprocess.run([py, "-c", SCRIPT], capture_output=True, text=True, cwd=work, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["weights"].startswith(str(env_dir)), out
    assert out["file"].startswith(str(env_dir)), out
    assert "gpt2-tiny-shakespeare" in out["models"]
    assert out["suite"].startswith(str(env_dir)) and out["suite_cases"] >= 49, out
    assert out["usage"]["completion_tokens"] >= 1 and out["text"]
