"""Golden suites: coverage of the case table, byte-identical regeneration, and the committed
suite of the bundled model (regenerated and diffed when the model is present)."""

from __future__ import annotations

import argparse
import filecmp
import json
from pathlib import Path

import pytest

from refcomplete import golden
from refcomplete._paths import weights_dir
from refcomplete.registry import load_model

COMMITTED = Path(__file__).parent / "golden"
BUNDLED = "gpt2-tiny-shakespeare"


@pytest.fixture(scope="module")
def tiny_suite(tiny_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("suite")
    return golden.generate_suite(load_model(str(tiny_dir)), "tiny", out)


def test_suite_covers_every_parameter_and_edge(tiny_suite):
    manifest, cases = golden.load_suite(tiny_suite)
    assert manifest["model"] == "tiny" and len(manifest["model_sha256"]) == 64
    assert {"tokenizer_sha256", "package_version", "contract_version"} <= set(manifest)
    params = {k for c in cases for k in c["request"]}
    assert params >= {"prompt", "max_tokens", "temperature", "top_p", "n", "best_of", "stream",
                      "stream_options", "logprobs", "echo", "stop", "presence_penalty",
                      "frequency_penalty", "logit_bias", "seed", "suffix"}
    tags = {t for c in cases for t in c["tags"]}
    assert tags >= {"greedy", "sampled", "echo_max0", "logprobs0", "utf8", "stop", "stream",
                    "best_of", "invalid", "token_ids", "penalties", "logit_bias", "eos"}
    by = {c["name"]: c for c in cases}
    assert by["echo_score_max0_lp0"]["expect"]["usage"]["completion_tokens"] == 0
    assert any(t.startswith("bytes:") for t in
               by["utf8_split_echo"]["expect"]["choices"][0]["logprobs"]["tokens"])
    assert by["stop_spans_tokens"]["expect"]["choices"][0]["finish_reason"] == "stop"
    assert by["eos_forced"]["expect"]["choices"][0]["logprobs"]["tokens"] == ["<|endoftext|>"]
    stream = by["stream_include_usage"]["expect"]
    assert stream[-1]["choices"] == [] and stream[-1]["usage"]["completion_tokens"] == 10
    for c in cases:
        if c["kind"] == "error":
            assert c["expect"]["status"] in (400, 404) and c["expect"]["error"]["message"]
        else:
            blob = json.dumps(c["expect"])
            assert '"cmpl-golden"' in blob and '"created": 0' in blob


def test_regeneration_is_byte_identical(tiny_dir, tiny_suite, tmp_path):
    again = golden.generate_suite(load_model(str(tiny_dir)), "tiny", tmp_path / "again")
    assert_same_tree(tiny_suite, again)


def test_tampered_suite_is_refused(tiny_suite, tmp_path):
    import shutil
    copy = shutil.copytree(tiny_suite, tmp_path / "copy")
    f = next((copy / "cases").glob("00_*.json"))
    f.write_text(f.read_text().replace("text_completion", "text_complet1on", 1))
    with pytest.raises(ValueError, match="sha256"):
        golden.load_suite(copy)


def test_cli_writes_a_suite(tiny_dir, tmp_path, capsys):
    ap = argparse.ArgumentParser()
    golden.add_subcommand(ap.add_subparsers())
    args = ap.parse_args(["golden", "--model", str(tiny_dir), "--name", "t", "--out",
                          str(tmp_path / "s")])
    assert args.handler(args) == 0 and "cases" in capsys.readouterr().out
    assert json.loads((tmp_path / "s" / "manifest.json").read_text())["model"] == "t"


def assert_same_tree(a: Path, b: Path) -> None:
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    _, mismatch, errors = filecmp.cmpfiles(a, b, [str(f) for f in files], shallow=False)
    assert not mismatch and not errors, f"regenerated files differ: {mismatch + errors}"


@pytest.mark.skipif(not (weights_dir() / BUNDLED / "model.safetensors").is_file(),
                    reason="the bundled model has not landed")
def test_committed_suite_regenerates_identically(tmp_path):
    assert (COMMITTED / "manifest.json").is_file(), \
        "tests/golden/ is missing: run `refcomplete golden --model gpt2-tiny-shakespeare --out tests/golden`"
    fresh = golden.generate_suite(load_model(BUNDLED), BUNDLED, tmp_path / "fresh")
    assert_same_tree(COMMITTED, fresh)
