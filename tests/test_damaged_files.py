"""Damaged model and tokenizer files: each gives a clear error naming the file (and the
tensor or field), the process stays usable, and create() answers 500 model_load_failed
without filesystem paths in the client's message (the exception's cause keeps them).

Decisions (docs/reliability.md): NaN or infinite weights are refused at load, naming the
tensor; logits are not checked at run time. A model whose files fail to load is a 500
`server_error` (code `model_load_failed`), not a 404: the model exists, the server's copy
is broken. We run as root, where chmod does not stop reads, so unreadable files are tested
in a subprocess that drops to uid 65534 first.
"""

import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from conftest import TINY
from refcomplete import CompletionError
from refcomplete import registry, tokenizer
from refcomplete.checkpoint import CheckpointError, load_checkpoint, write_random_checkpoint
from refcomplete.completions import Completions
from refcomplete.errors import ModelLoadError
from refcomplete.tokenizer import Tokenizer, TokenizerFileError, load_ranks


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    return write_random_checkpoint(tmp_path_factory.mktemp("good"), TINY, seed=3)


def parts(directory):
    raw = (directory / "model.safetensors").read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def damaged_copy(good, dst, data=None, header=None, config=None):
    """A copy of `good` with its safetensors bytes, header dict or config dict replaced."""
    shutil.copytree(good, dst)
    if header is not None:
        h, body = parts(good)
        blob = json.dumps(header(h)).encode()
        data = struct.pack("<Q", len(blob)) + blob + body
    if data is not None:
        (dst / "model.safetensors").write_bytes(data(good) if callable(data) else data)
    if config is not None:
        cfg = json.loads((good / "config.json").read_text())
        (dst / "config.json").write_text(json.dumps(config(cfg)))
    return dst


def entry(key, **change):
    def f(h):
        return {**h, key: {**h[key], **change}}
    return f


def whole(good):
    return (good / "model.safetensors").read_bytes()


K = "h.1.attn.c_proj.weight"
SAFETENSORS_DAMAGE = {   # name -> (damaged_copy kwargs, words the message must hold)
    "empty file": (dict(data=b""), ["truncated"]),
    "7 bytes": (dict(data=b"\x10\0\0\0\0\0\0"), ["truncated"]),
    "header length past the end": (dict(data=lambda g: struct.pack("<Q", 1 << 40) + whole(g)[8:]),
                                   ["truncated"]),
    "header cut": (dict(data=lambda g: whole(g)[:200]), ["truncated"]),
    "data cut in half": (dict(data=lambda g: whole(g)[:len(whole(g)) // 2]), ["outside the file"]),
    "last byte missing": (dict(data=lambda g: whole(g)[:-1]), ["outside the file"]),
    "trailing garbage": (dict(data=lambda g: whole(g) + b"\0" * 8), ["bytes after the last tensor"]),
    "header not JSON": (dict(data=lambda g: whole(g)[:8] + b"#" * 16 + whole(g)[24:]),
                        ["damaged safetensors header"]),
    "header a list": (dict(header=lambda h: [1, 2]), ["not a JSON object"]),
    "header deeply nested": (dict(data=lambda g: struct.pack("<Q", 200000) + b"[" * 100000
                                  + b"]" * 100000 + whole(g)[8:]), ["damaged safetensors header"]),
    "dtype I64": (dict(header=entry(K, dtype="I64")), [K, "unsupported dtype", "I64"]),
    "dtype F64": (dict(header=entry(K, dtype="F64")), [K, "F64"]),
    "dtype missing": (dict(header=lambda h: {**h, K: {"shape": [64, 64], "data_offsets": [0, 4]}}),
                      [K, "dtype"]),
    "entry not an object": (dict(header=lambda h: {**h, K: [1]}), [K]),
    "shape negative": (dict(header=entry(K, shape=[-64, -64])), [K, "bad shape"]),
    "shape floats": (dict(header=entry(K, shape=[64.0, 64.0])), [K, "bad shape"]),
    "shape wrong size": (dict(header=entry(K, shape=[64, 65])), [K, "outside the file"]),
    "offsets reversed": (dict(header=lambda h: entry(K, data_offsets=h[K]["data_offsets"][::-1])(h)),
                         [K]),
    "offsets negative": (dict(header=entry(K, data_offsets=[-4, 16380])), [K, "data_offsets"]),
    "offsets three": (dict(header=entry(K, data_offsets=[0, 1, 2])), [K, "data_offsets"]),
    "offsets shifted (overlap)": (dict(header=lambda h: entry(K, data_offsets=[
        h[K]["data_offsets"][0] + 4, h[K]["data_offsets"][1] + 4])(h)), ["overlapping"]),
    "tensor missing": (dict(header=lambda h: {k: v for k, v in h.items() if k != K}),
                       ["overlapping or misplaced"]),
}


@pytest.mark.parametrize("case", list(SAFETENSORS_DAMAGE), ids=list(SAFETENSORS_DAMAGE))
def test_damaged_safetensors_names_the_file(good, tmp_path, case):
    kw, words = SAFETENSORS_DAMAGE[case]
    d = damaged_copy(good, tmp_path / "d", **kw)
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(d)
    msg = str(e.value)
    assert msg.startswith(str(d / "model.safetensors")), msg
    for w in words:
        assert w in msg, msg
    assert len(msg) < 600


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_non_finite_weights_are_refused_at_load_naming_the_tensor(good, tmp_path, value, dtype):
    from safetensors.numpy import save_file
    from refcomplete.checkpoint import read_safetensors
    t = {k: np.array(v).astype(dtype) for k, v in read_safetensors(good / "model.safetensors").items()}
    t["h.0.mlp.c_fc.weight"][3, 7] = value
    d = damaged_copy(good, tmp_path / "nan")
    save_file(t, str(d / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: tensor 'h\.0\.mlp\.c_fc\.weight' "
                                              r"holds NaN or infinite values"):
        load_checkpoint(d)


CONFIG_DAMAGE = {
    "n_layer more than the tensors": (lambda c: {**c, "n_layer": 3}, "model.safetensors", "h.2"),
    "n_layer fewer": (lambda c: {**c, "n_layer": 1}, "model.safetensors", "unexpected tensors"),
    "n_embd": (lambda c: {**c, "n_embd": 32, "n_head": 4}, "model.safetensors", "wte.weight"),
    "n_positions": (lambda c: {**c, "n_positions": 128}, "model.safetensors", "wpe.weight"),
    "vocab_size": (lambda c: {**c, "vocab_size": 50000}, "model.safetensors", "wte.weight"),
    "n_head zero": (lambda c: {**c, "n_head": 0}, "config.json", "n_head"),
    "n_head not dividing": (lambda c: {**c, "n_head": 5}, "config.json", "multiple of n_head"),
    "n_layer negative": (lambda c: {**c, "n_layer": -1}, "config.json", "n_layer"),
    "vocab_size a string": (lambda c: {**c, "vocab_size": "50257"}, "config.json", "vocab_size"),
    "vocab_size a bool": (lambda c: {**c, "vocab_size": True}, "config.json", "vocab_size"),
    "vocab_size a float": (lambda c: {**c, "vocab_size": 50257.5}, "config.json", "vocab_size"),
    "epsilon NaN": (lambda c: {**c, "layer_norm_epsilon": float("nan")}, "config.json",
                    "layer_norm_epsilon"),
    "epsilon negative": (lambda c: {**c, "layer_norm_epsilon": -1e-5}, "config.json",
                         "layer_norm_epsilon"),
    "tie a string": (lambda c: {**c, "tie_word_embeddings": "no"}, "config.json",
                     "tie_word_embeddings"),
    "activation": (lambda c: {**c, "activation_function": "relu"}, "config.json", "relu"),
    "not an object": (lambda c: [c], "config.json", "not a JSON object"),
    "field missing": (lambda c: {k: v for k, v in c.items() if k != "n_embd"}, "config.json",
                      "n_embd"),
}


@pytest.mark.parametrize("case", list(CONFIG_DAMAGE), ids=list(CONFIG_DAMAGE))
def test_config_that_does_not_match_or_is_malformed(good, tmp_path, case):
    patch, file, word = CONFIG_DAMAGE[case]
    d = damaged_copy(good, tmp_path / "c", config=patch)
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(d)
    assert str(e.value).startswith(str(d / file)) and word in str(e.value), str(e.value)


def test_config_unreadable_text(good, tmp_path):
    d = damaged_copy(good, tmp_path / "t")
    for blob in (b"\xff\xfe\x00", b"{" * 5000 + b"}" * 5000, b"[" * 100000, b""):
        (d / "config.json").write_bytes(blob)
        with pytest.raises(CheckpointError, match=r"config\.json"):
            load_checkpoint(d)


def test_consistent_checkpoint_with_another_vocabulary_is_refused_by_the_registry(tmp_path):
    from refcomplete.checkpoint import GPT2Config
    d = write_random_checkpoint(tmp_path / "v", GPT2Config(n_vocab=1000, n_layer=1, n_embd=32,
                                                            n_head=2, n_ctx=16))
    assert load_checkpoint(d).config.n_vocab == 1000          # a well-formed file...
    with pytest.raises(CheckpointError, match=r"config\.json: vocab_size 1000 does not match"):
        registry.load_model(str(d))                           # ...that r50k cannot serve


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.data())
def test_random_header_corruption_loads_or_fails_cleanly(good, tmp_path_factory, data):
    """Random byte edits and cuts in the header and the first data bytes: either the file
    still loads (an edit inside a float or in JSON whitespace) or a CheckpointError."""
    raw = bytearray(whole(good))
    n = struct.unpack("<Q", raw[:8])[0]
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, 8 + n + 64))
        raw[i] = data.draw(st.integers(0, 255))
    if data.draw(st.booleans()):
        raw = raw[:data.draw(st.integers(0, len(raw)))]
    d = tmp_path_factory.mktemp("fuzzed")
    shutil.copy(good / "config.json", d / "config.json")
    (d / "model.safetensors").write_bytes(bytes(raw))
    try:
        load_checkpoint(d)
    except CheckpointError as e:
        assert str(d / "model.safetensors") in str(e)


# -- the tokenizer file ------------------------------------------------------------------

def test_tokenizer_file_with_the_wrong_hash_names_the_file(tmp_path):
    src = tokenizer.weights_dir() / "r50k_base.tiktoken"
    bad = tmp_path / "r50k_base.tiktoken"
    data = bytearray(src.read_bytes())
    data[1000] ^= 1
    bad.write_bytes(bytes(data))
    with pytest.raises(TokenizerFileError, match=rf"{bad}.*corrupted: sha256 [0-9a-f]{{64}}, expected"):
        Tokenizer(bad)
    bad.write_bytes(src.read_bytes()[:-10])
    with pytest.raises(TokenizerFileError, match="corrupted"):
        load_ranks(bad)
    with pytest.raises(TokenizerFileError, match=rf"{tmp_path / 'missing'}.*cannot be read"):
        load_ranks(tmp_path / "missing")


# -- create(): 500 model_load_failed, no paths, the process stays usable ----------------

def test_create_answers_500_without_paths_and_recovers(good, tmp_path):
    bad = damaged_copy(good, tmp_path / "bad", data=lambda g: whole(g)[:1000])
    paths = {"served": bad, "other": good}
    api = Completions(lambda name: registry.load_model(str(paths[name])))   # NAME=PATH, as serve
    with pytest.raises(CompletionError) as e:
        api.create(model="served", prompt="Hi", max_tokens=2)
    err = e.value
    assert isinstance(err, ModelLoadError) and err.status == 500
    assert err.to_dict() == {"error": {
        "message": "The model `served` could not be loaded: its files on the server are damaged "
                   "or unreadable.", "type": "server_error", "param": "model",
        "code": "model_load_failed"}}
    assert "/" not in err.message and str(tmp_path) not in json.dumps(err.to_dict())
    assert isinstance(err.__cause__, CheckpointError) and str(bad) in str(err.__cause__)
    # the same process serves a good model next, and the repaired model on the next try
    r = api.create(model="other", prompt="Hi", max_tokens=2, temperature=0)
    assert r["usage"]["completion_tokens"] == 2
    shutil.copy(good / "model.safetensors", bad / "model.safetensors")
    assert api.create(model="served", prompt="Hi", max_tokens=2, temperature=0)["choices"] \
        == r["choices"]


def test_damaged_tokenizer_through_create_is_a_500_and_recovers(good, tmp_path, monkeypatch):
    src = tokenizer.weights_dir() / "r50k_base.tiktoken"
    (tmp_path / "r50k_base.tiktoken").write_bytes(src.read_bytes()[:-2] + b"\n")  # one line cut
    monkeypatch.setattr(tokenizer, "weights_dir", lambda: tmp_path)
    tokenizer.get_tokenizer.cache_clear()
    registry._load.cache_clear()
    try:
        api = Completions(lambda name: registry.load_model(str(good)))
        with pytest.raises(ModelLoadError) as e:
            api.create(model="m", prompt="Hi", max_tokens=1)
        assert isinstance(e.value.__cause__, TokenizerFileError)
        assert "r50k_base.tiktoken" not in e.value.message
        monkeypatch.undo()
        tokenizer.get_tokenizer.cache_clear()
        assert api.create(model="m", prompt="Hi", max_tokens=1)["usage"]["completion_tokens"] == 1
    finally:
        monkeypatch.undo()
        tokenizer.get_tokenizer.cache_clear()
        registry._load.cache_clear()


def test_loader_bugs_are_500s_too():
    def broken(name):
        raise MemoryError("no room")
    with pytest.raises(ModelLoadError) as e:
        Completions(broken).create(model="x", prompt="Hi")
    assert isinstance(e.value.__cause__, MemoryError)
    with pytest.raises(CompletionError) as e:
        Completions({}).create(model="x" * 10000, prompt="Hi")
    assert e.value.status == 404 and len(e.value.message) < 400


# -- unreadable files and directories ----------------------------------------------------

UNREADABLE = textwrap.dedent("""
    import json, os, sys
    from refcomplete import registry
    from refcomplete.checkpoint import CheckpointError, load_checkpoint
    from refcomplete.completions import Completions
    from refcomplete.errors import CompletionError
    import refcomplete.runtime     # stdlib and site-packages may be unreadable to nobody
    if os.geteuid() == 0:          # root reads through chmod: drop to nobody first
        os.setgid(65534); os.setuid(65534)
    out = {}
    for name in sys.argv[1:]:
        try:
            load_checkpoint(name); out[name] = ["loaded"]
        except CheckpointError as e:
            out[name] = ["CheckpointError", str(e)]
        try:
            registry.resolve(name); out[name].append("resolved")
        except CheckpointError as e:
            out[name].append("resolve: " + str(e))
        except registry.ModelNotFound as e:
            out[name].append("resolve: not found")
        try:
            Completions().create(model=name, prompt="Hi", max_tokens=1); out[name].append("served")
        except CompletionError as e:
            out[name].append([e.status, e.message, type(e.__cause__).__name__])
    print(json.dumps(out))
""")


def test_unreadable_file_and_directory(good):
    tmp_path = Path(tempfile.mkdtemp(prefix="refcomplete-unreadable-"))   # pytest's is 0700
    tmp_path.chmod(0o755)
    open_copy = damaged_copy(good, tmp_path / "open")
    for f in open_copy.iterdir():
        f.chmod(0o644)
    open_copy.chmod(0o755)
    good = open_copy
    file_locked = damaged_copy(good, tmp_path / "file_locked")
    (file_locked / "model.safetensors").chmod(0)
    config_locked = damaged_copy(good, tmp_path / "config_locked")
    (config_locked / "config.json").chmod(0)
    dir_locked = damaged_copy(good, tmp_path / "dir_locked")
    dir_locked.chmod(0)
    try:
        names = [str(file_locked), str(config_locked), str(dir_locked)]
        run = subprocess.run([sys.executable, "-c", UNREADABLE, *names], capture_output=True,
                             text=True, timeout=120, cwd="/")
        if run.returncode and "Operation not permitted" in run.stderr:
            pytest.skip("cannot drop privileges here")
        assert run.returncode == 0, run.stderr
        out = json.loads(run.stdout)
    finally:
        dir_locked.chmod(0o755)
        shutil.rmtree(tmp_path)
    kind, msg, resolved, served = out[str(file_locked)]
    assert kind == "CheckpointError" and msg.startswith(str(file_locked / "model.safetensors"))
    assert "Permission denied" in msg and resolved == "resolved"
    assert served == [500, f"The model `{file_locked}` could not be loaded: its files on the "
                      "server are damaged or unreadable.", "CheckpointError"]
    kind, msg, _, served = out[str(config_locked)]
    assert msg.startswith(str(config_locked / "config.json")) and "Permission denied" in msg
    assert served[0] == 500
    kind, msg, resolved, served = out[str(dir_locked)]
    assert kind == "CheckpointError" and str(dir_locked) in msg
    assert resolved.startswith(f"resolve: {dir_locked}: cannot read the model directory")
    assert served[0] == 500 and served[2] == "CheckpointError"
