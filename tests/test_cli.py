"""The `refcomplete` command, with the default loader pointed at a fake model."""

import json

import pytest

from fakes import FakeModel, scripted_text
from refcomplete import cli, completions


@pytest.fixture(autouse=True)
def fake_models(monkeypatch):
    api = completions.Completions({"gpt2-tiny-shakespeare": scripted_text(" to be, or not"),
                                   "fake": FakeModel()})
    monkeypatch.setattr(completions, "_default", api)


def run(capsys, *argv):
    code = cli.main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_complete_streams_text(capsys):
    code, out, _ = run(capsys, "complete", "ROMEO:", "--temperature", "0")
    assert code == 0 and out == " to be, or not\n"


def test_json_prints_the_raw_response(capsys):
    code, out, _ = run(capsys, "complete", "Hi", "--model", "fake", "--json", "--seed", "3",
                       "--n", "2", "--stop", "a", "--stop", "b")
    r = json.loads(out)
    assert code == 0 and r["object"] == "text_completion" and len(r["choices"]) == 2


def test_logprobs_view_shows_tokens_and_alternatives(capsys):
    code, out, _ = run(capsys, "complete", "Hi", "--logprobs", "2", "--temperature", "0",
                       "--max-tokens", "3", "--echo")
    lines = out.splitlines()
    assert code == 0 and lines[0] == "Hi to be,"
    assert lines[1].split() == ["offset", "token", "logprob", "prob", "|", "alternatives"]
    assert "first prompt token" in lines[2] and "' to'" in lines[3] and "%" in lines[3]
    assert lines[2].split()[0] == "0" and lines[3].split()[0] == "2"   # the text offsets
    assert lines[3].index("%") == lines[1].rindex("prob") + 3   # columns aligned


def test_trace_view(capsys):
    code, out, _ = run(capsys, "complete", "Hi", "--model", "fake", "--trace", "--max-tokens", "2")
    assert code == 0 and "step 1" in out and "temperature" in out


def test_bad_request_exits_2_with_the_message(capsys):
    code, _, err = run(capsys, "complete", "Hi", "--temperature", "5")
    assert code == 2 and "greater than the maximum of 2 - 'temperature'" in err
    code, _, err = run(capsys, "complete", "Hi", "--model", "nope")
    assert code == 2 and "404" in err


def test_models_lists_loadable_models(capsys, monkeypatch):
    monkeypatch.setattr("refcomplete.registry.list_models", lambda: ["a", "b"])
    assert run(capsys, "models")[:2] == (0, "a\nb\n")


def test_backend_flag_loads_that_backend(monkeypatch, capsys):
    seen = []
    monkeypatch.setattr(completions, "registry_loader",
                        lambda name, backend=None: seen.append((name, backend)) or FakeModel())
    code, out, _ = run(capsys, "complete", "Hi", "--backend", "numpy", "--max-tokens", "2", "--json")
    assert code == 0 and seen == [("gpt2-tiny-shakespeare", "numpy")]
    with pytest.raises(SystemExit):
        cli.main(["complete", "Hi", "--backend", "cuda"])
