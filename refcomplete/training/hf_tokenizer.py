"""Hugging Face GPT-2 tokenizer files (vocab.json, merges.txt, tokenizer_config.json)
generated from the bundled r50k_base ranks.

Knows: GPT-2's byte<->unicode alphabet and how BPE ranks imply the merge list.
Does not know: models. Needs no transformers to write the files.

A ranks file lists tokens by merge priority; the merge that creates token t is
found by running BPE on t's bytes with only the merges ranked below t, which
leaves exactly two parts. Ranks 0..255 are the single bytes, 256..50255 the
50000 merges, 50256 is `<|endoftext|>`.

Run `python -m refcomplete.training.hf_tokenizer OUT_DIR`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from refcomplete.tokenizer import ENDOFTEXT, EOT_ID, get_tokenizer, load_ranks


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable unicode characters."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def _bpe_split(ranks: dict[bytes, int], token: bytes, max_rank: int) -> list[bytes]:
    parts = [bytes([b]) for b in token]
    while True:
        best, best_i = None, None
        for i in range(len(parts) - 1):
            r = ranks.get(parts[i] + parts[i + 1])
            if r is not None and r < max_rank and (best is None or r < best):
                best, best_i = r, i
        if best is None:
            return parts
        parts = parts[:best_i] + [parts[best_i] + parts[best_i + 1]] + parts[best_i + 2 :]


def vocab_and_merges(ranks: dict[bytes, int]) -> tuple[dict[str, int], list[str]]:
    b2u = bytes_to_unicode()

    def u(b: bytes) -> str:
        return "".join(b2u[x] for x in b)

    vocab = {u(tok): rank for tok, rank in ranks.items()}
    merges = []
    for tok, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(tok) == 1:
            continue
        parts = _bpe_split(ranks, tok, rank)
        if len(parts) != 2:
            raise ValueError(f"rank {rank} ({tok!r}) does not come from one merge: {parts}")
        merges.append(f"{u(parts[0])} {u(parts[1])}")
    vocab[ENDOFTEXT] = EOT_ID
    return vocab, merges


def write_hf_tokenizer(out_dir: Path, model_max_length: int = 512) -> list[Path]:
    """Write vocab.json, merges.txt and tokenizer_config.json into out_dir."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ranks = load_ranks(get_tokenizer().path)
    vocab, merges = vocab_and_merges(ranks)
    paths = [out_dir / "vocab.json", out_dir / "merges.txt", out_dir / "tokenizer_config.json"]
    paths[0].write_text(json.dumps(vocab, ensure_ascii=False) + "\n", encoding="utf-8")
    paths[1].write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    config = {
        "tokenizer_class": "GPT2Tokenizer",
        "add_prefix_space": False,
        "add_bos_token": False,
        "bos_token": ENDOFTEXT,
        "eos_token": ENDOFTEXT,
        "unk_token": ENDOFTEXT,
        "model_max_length": model_max_length,
        "clean_up_tokenization_spaces": False,
        "errors": "replace",
    }
    paths[2].write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return paths


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out_dir")
    ap.add_argument("--model-max-length", type=int, default=512)
    args = ap.parse_args(argv)
    for p in write_hf_tokenizer(Path(args.out_dir), args.model_max_length):
        print(p)


if __name__ == "__main__":
    main()
