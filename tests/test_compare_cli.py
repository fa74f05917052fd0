"""compare's and export's command lines: the suite used by default (the bundled one, named),
one clear line for what stops a run (no suite, bad --extra-body, no server, a bad --out,
an unknown model), and the stream checks' broken twins."""

from __future__ import annotations

import argparse
import json
import socket

import pytest

from refcomplete import compare, export_gguf
from refcomplete.compare_replay import Replayer


def run(capsys, module, *argv):
    ap = argparse.ArgumentParser()
    module.add_subcommand(ap.add_subparsers())
    args = ap.parse_args(list(argv))
    code = args.handler(args)
    out = capsys.readouterr()
    return code, out.out, out.err


def dead_url() -> str:
    with socket.socket() as s:       # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


def test_the_bundled_model_gets_the_bundled_suite_and_says_so(capsys):
    assert (compare.bundled_suite() / "manifest.json").is_file()
    manifest = json.loads((compare.bundled_suite() / "manifest.json").read_text())
    assert manifest["model"] == compare.BUNDLED_MODEL
    url = dead_url()
    code, out, err = run(capsys, compare, "compare", "--base-url", url, "--model", "gpt2-tiny-shakespeare")
    assert code == 2 and "using the bundled gpt2-tiny-shakespeare suite" in err
    code, _, err = run(capsys, compare, "compare", "--base-url", url, "--model", "x",
                       "--suite", "bundled")
    assert code == 2 and "using the bundled" in err
    assert compare.is_bundled("weights/gpt2-tiny-shakespeare/") and compare.is_bundled(
        "gpt2-tiny-shakespeare.gguf") and not compare.is_bundled("tiny.gguf")


def test_an_unreachable_server_is_one_message(capsys):
    code, out, err = run(capsys, compare, "compare", "--base-url", dead_url() + "/v1", "--model",
                         "gpt2-tiny-shakespeare")
    lines = [x for x in err.splitlines() if "error" in x]
    assert code == 2 and len(lines) == 1 and "cannot reach" in lines[0] and "first case" in lines[0]
    assert "Traceback" not in err and out == ""


@pytest.mark.parametrize("argv, message", [
    (["--model", "other-model"], "is not the bundled gpt2-tiny-shakespeare: give --suite"),
    (["--model", "m", "--suite", "no/such/suite"], "no golden suite at no/such/suite"),
    (["--model", "gpt2-tiny-shakespeare", "--extra-body", "{top_k: 0}"], "--extra-body is not valid JSON"),
    (["--model", "gpt2-tiny-shakespeare", "--extra-body", "[1]"], "must be a JSON object"),
    (["--model", "gpt2-tiny-shakespeare", "--report", "no/such/dir/r.json"], "of --report"),
])
def test_what_stops_a_run_is_one_clear_line(capsys, argv, message):
    code, out, err = run(capsys, compare, "compare", "--base-url", dead_url(), *argv)
    assert code == 2 and err.count("\n") == 1 and message in err and "Traceback" not in err


def test_export_errors_are_one_clear_line(capsys, tmp_path):
    for argv, message in [(["--out", str(tmp_path)], "is a directory"),
                          (["--out", str(tmp_path / "nope" / "m.gguf")], "does not exist"),
                          (["--model", "no-such-model", "--out", str(tmp_path / "m.gguf")],
                           "model 'no-such-model' not found")]:
        code, out, err = run(capsys, export_gguf, "export", *argv)
        assert code == 2 and err.startswith("refcomplete export: error:") and message in err, err
        assert err.count("\n") == 1
    assert not list(tmp_path.iterdir())


def chunk(text, usage="null", choices=True):
    c = {"id": "cmpl-1", "object": "text_completion", "created": 0, "model": "m",
         "choices": [{"text": text, "index": 0, "logprobs": None, "finish_reason": None}] if choices else []}
    if usage != "omit":
        c["usage"] = None if usage == "null" else usage
    return c


USAGE = {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}
INCLUDE = {"stream": True, "stream_options": {"include_usage": True}}


def usage_findings(chunks):
    res = compare.CaseResult("t", "completion")
    Replayer("http://x", "m")._usage_chunks(res, INCLUDE, chunks, "")
    return [f.outcome for f in res.findings]


def test_usage_chunk_dialects_and_their_broken_twins():
    good = [chunk("a"), chunk("b"), chunk("", USAGE, choices=False)]
    assert usage_findings(good) == []
    assert usage_findings([chunk("a", "omit"), chunk("b", "omit")]) == ["no_usage_chunk"]
    assert usage_findings([chunk("a", "omit"), chunk("b", "omit"), chunk("", USAGE, False)]) == \
        ["usage_null_omitted"]
    assert usage_findings([chunk("a", USAGE), chunk("b"), chunk("", USAGE, False)]) == ["mismatch"]
    assert usage_findings([chunk("a"), chunk("b", USAGE)]) == ["mismatch"]


def test_stream_ignores_echo_needs_the_prompt_missing_and_nothing_else():
    def fits(stream_text, plain_text, prompt="To be"):
        res = compare.CaseResult("t", "completion")
        folded = {"choices": [{"index": 0, "text": stream_text}]}
        plain = {"choices": [{"index": 0, "text": plain_text}]}
        return Replayer("http://x", "m")._echo_ignored(res, {"prompt": prompt, "echo": True},
                                                       folded, plain)
    assert fits(", or not", "To be, or not")
    assert not fits(", or NOT", "To be, or not")          # the broken twin: other text
    assert not fits("be, or not", "To be, or not")        # part of the prompt is not the echo
    assert not fits("To be, or not", "To be, or not")     # nothing missing


def test_docs_list_every_dialect_and_no_machine_path():
    from pathlib import Path
    doc = (Path(__file__).parents[1] / "docs" / "golden.md").read_text(encoding="utf-8")
    table = [line for line in doc.splitlines() if line.startswith("| `")]
    assert {line.split("`")[1] for line in table} >= set(compare.DIALECTS)
    assert all(name in doc for name in compare.FAILURES)
    assert "/work/" not in doc and "/home/" not in doc and "/tmp/" not in doc


def _suite_copy(tmp_path, keep=None, sha=None):
    """The bundled suite copied, its sampling.json cut to `keep` cases (sha256 updated) or
    its model's sha256 replaced."""
    import hashlib
    import shutil

    from refcomplete.golden import dumps
    dst = tmp_path / "suite"
    shutil.copytree(compare.bundled_suite(), dst)
    manifest = json.loads((dst / "manifest.json").read_text())
    if keep is not None:
        items = json.loads((dst / "sampling.json").read_text())["cases"][:keep]
        text = dumps({"cases": items})
        (dst / "sampling.json").write_text(text)
        manifest["sampling"]["sha256"] = hashlib.sha256(text.encode()).hexdigest()
    if sha is not None:
        manifest["model_sha256"] = sha
    (dst / "manifest.json").write_text(dumps(manifest))
    return dst


def test_the_bundled_suite_carries_the_sampling_cases_compare_would_build():
    from refcomplete.compare_sampling import build_cases, cases_from_json
    from refcomplete.golden import load_sampling
    from refcomplete.registry import load_model
    manifest, items = load_sampling(compare.bundled_suite())
    model = load_model(compare.BUNDLED_MODEL)
    assert manifest["model_sha256"] == model.weights_sha256
    assert cases_from_json(items) == build_cases(model)          # floats through JSON exactly
    assert cases_from_json(items, 0.5) == build_cases(model, 0.5)


def test_compare_takes_a_suites_sampling_cases_and_checks_its_model(capsys, tmp_path):
    one = _suite_copy(tmp_path / "a", keep=1)
    code, _, err = run(capsys, compare, "compare", "--base-url", dead_url(), "--model",
                       "gpt2-tiny-shakespeare", "--suite", str(one), "--sampling-only")
    assert code == 2 and f"1 cases from {one}" in err and "cannot reach" in err
    other = _suite_copy(tmp_path / "b", sha="0" * 64)
    code, _, err = run(capsys, compare, "compare", "--base-url", dead_url(), "--model",
                       "gpt2-tiny-shakespeare", "--suite", str(other), "--sampling")
    assert code == 2 and "sampling cases were written for" in err and "Traceback" not in err
    bad = _suite_copy(tmp_path / "c")
    (bad / "sampling.json").write_text((bad / "sampling.json").read_text().replace("0.7", "0.9", 1))
    code, _, err = run(capsys, compare, "compare", "--base-url", dead_url(), "--model",
                       "gpt2-tiny-shakespeare", "--suite", str(bad), "--sampling")
    assert code == 2 and "sha256 differs" in err
    newer = _suite_copy(tmp_path / "d")            # another suite_version: not read, either part
    manifest = json.loads((newer / "manifest.json").read_text())
    (newer / "manifest.json").write_text(json.dumps({**manifest, "suite_version": 99}))
    code, _, err = run(capsys, compare, "compare", "--base-url", dead_url(), "--model",
                       "gpt2-tiny-shakespeare", "--suite", str(newer), "--sampling-only")
    assert code == 2 and "suite_version 99" in err and "cannot reach" not in err


def test_sampling_only_with_a_suite_dir_that_has_no_manifest_is_an_error(capsys, tmp_path):
    (tmp_path / "empty").mkdir()
    code, _, err = run(capsys, compare, "compare", "--base-url", dead_url(), "--model",
                       "gpt2-tiny-shakespeare", "--suite", str(tmp_path / "empty"),
                       "--sampling-only")
    assert code == 2 and "no golden suite there" in err and "Traceback" not in err
    assert "cannot reach" not in err                  # stopped before any request
