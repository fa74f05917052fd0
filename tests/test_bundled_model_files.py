"""The bundled gpt2-tiny-shakespeare directory: complete, self-consistent, loadable by HF offline."""

import hashlib
import json
import os
import struct

import pytest

from refcomplete._paths import weights_dir
from refcomplete.tokenizer import EOT_ID, get_tokenizer

MODEL_DIR = weights_dir() / "gpt2-tiny-shakespeare"
FILES = ["config.json", "model.safetensors", "vocab.json", "merges.txt", "tokenizer_config.json",
         "training.json", "README.md"]
SHIPPED_PATTERNS = (".json", ".txt", ".safetensors", ".md")  # the wheel's package-data patterns

CORPUS = [
    "",
    "Hello world",
    "ROMEO:\nBut, soft! what light through yonder window breaks?\n\n",
    "First Citizen:\nBefore we proceed any further, hear me speak.\n",
    "  leading spaces,   runs of    spaces\n\n\n\t\ttabs\r\nand CRLF   \n  ",
    "trailing space ",
    "naïve café — “curly quotes” ‘single’ … Œuvre ß",
    "日本語のテキスト, 中文, 한국어, Ελληνικά, русский",
    "emoji 😀👍🏽 and a lone combining mark \u0301",
    "\u00a0nbsp\u2009thin\u3000ideographic space",
    "<|endoftext|>",
    "a<|endoftext|>b <|endoftext|>\n<|endoftext|><|endoftext|>",
    "don't I'LL we've they're she'd 'tis o'er",
    "12345 3.14159 1,000,000 0x1F",
    "#!@$%^&*()_+-=[]{}|;':\",./<>?`~\\",
    "<|endoftext",
    "x" * 300 + " " + "ab" * 100,
]


@pytest.fixture(scope="module")
def training():
    return json.loads((MODEL_DIR / "training.json").read_text())


def test_directory_complete():
    for name in FILES:
        assert (MODEL_DIR / name).is_file(), name
    for path in MODEL_DIR.iterdir():
        assert path.is_file() and path.name.endswith(SHIPPED_PATTERNS), f"{path.name} would not ship in the wheel"


def test_training_json_consistent(training):
    data = (MODEL_DIR / "model.safetensors").read_bytes()
    assert len(data) <= 32 * 1024 * 1024
    assert training["weights_sha256"] == hashlib.sha256(data).hexdigest()
    assert training["weights_bytes"] == len(data)
    for key in ("heldout", "val_loss", "val_loss_seen_tokens", "unigram_val_loss", "bigram_val_loss",
                "train_tokens", "seed", "train_seconds", "config", "hardware", "epochs"):
        assert key in training, key
    assert sorted(training["heldout"]) == ["plays/comedies/twelfth-night.md", "plays/tragedies/macbeth.md"]
    assert training["val_loss"] <= 5.25
    assert training["val_loss"] < training["bigram_val_loss"] < training["unigram_val_loss"]
    config = json.loads((MODEL_DIR / "config.json").read_text())
    for key, value in training["config"].items():
        assert config.get(key, value) == value, key


def test_safetensors_header_fp32_tied():
    data = (MODEL_DIR / "model.safetensors").read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    tensors = {k: v for k, v in header.items() if k != "__metadata__"}
    assert all(v["dtype"] == "F32" for v in tensors.values())
    config = json.loads((MODEL_DIR / "config.json").read_text())
    assert tensors["transformer.wte.weight"]["shape"] == [config["vocab_size"], config["n_embd"]]
    assert tensors["transformer.wpe.weight"]["shape"] == [config["n_positions"], config["n_embd"]]
    assert "lm_head.weight" not in tensors  # tied to wte, as HF saves it


def test_tokenizer_files_match_r50k_without_transformers():
    vocab = json.loads((MODEL_DIR / "vocab.json").read_text(encoding="utf-8"))
    assert len(vocab) == 50257 and vocab["<|endoftext|>"] == EOT_ID
    assert sorted(vocab.values()) == list(range(50257))
    merges = (MODEL_DIR / "merges.txt").read_text(encoding="utf-8").splitlines()
    assert merges[0].startswith("#version") and len(merges) == 1 + 50000
    cfg = json.loads((MODEL_DIR / "tokenizer_config.json").read_text())
    assert cfg["bos_token"] == cfg["eos_token"] == cfg["unk_token"] == "<|endoftext|>"
    from refcomplete.training.hf_tokenizer import vocab_and_merges
    from refcomplete.tokenizer import load_ranks

    expected_vocab, expected_merges = vocab_and_merges(load_ranks(get_tokenizer().path))
    assert vocab == expected_vocab
    assert merges[1:] == expected_merges


@pytest.fixture(scope="module")
def hf_tokenizer():
    transformers = pytest.importorskip("transformers")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    return transformers.AutoTokenizer.from_pretrained(MODEL_DIR, local_files_only=True)


def _varied_corpus():
    text = CORPUS[:]
    plays_txt = MODEL_DIR / "README.md"
    text.append(plays_txt.read_text(encoding="utf-8"))
    return text


def test_hf_tokenizer_encodes_like_ours(hf_tokenizer):
    ours = get_tokenizer()
    assert hf_tokenizer.eos_token_id == hf_tokenizer.bos_token_id == EOT_ID
    assert len(hf_tokenizer) == 50257
    for text in _varied_corpus():
        ids = ours.encode(text)
        assert hf_tokenizer.encode(text, add_special_tokens=False) == ids, repr(text[:60])
        assert hf_tokenizer.decode(ids) == ours.decode(ids)


def test_hf_tokenizer_property(hf_tokenizer):
    hypothesis = pytest.importorskip("hypothesis")
    from hypothesis import given, settings, strategies as st

    ours = get_tokenizer()
    alphabet = st.sampled_from(list(" \n\t\r  aZ'sé—😀日<|>endoftx0.,!"))

    @settings(max_examples=200, deadline=None)
    @given(st.lists(alphabet, max_size=40).map("".join))
    def check(text):
        assert hf_tokenizer.encode(text, add_special_tokens=False) == ours.encode(text)

    check()


def test_hf_model_loads_offline(training):
    pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    import torch

    model = transformers.AutoModelForCausalLM.from_pretrained(MODEL_DIR, local_files_only=True)
    cfg = model.config
    for key, value in training["config"].items():
        assert getattr(cfg, key) == value, key
    assert sum(p.numel() for p in model.parameters()) == training["n_params"]
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()
    ids = torch.tensor([get_tokenizer().encode("ROMEO:\n")])
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert logits.shape == (1, ids.shape[1], cfg.vocab_size)
    assert torch.isfinite(logits).all()
