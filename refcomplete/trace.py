"""`trace=True`: what happened at each decode step, for people studying the sampler.

Knows: how to summarise the sampling pipeline's intermediates (sampling.run with
trace=True) as the top candidates and their probabilities after each stage, plus the
coin, the slice of [0, 1) the coin had to fall in, and the chosen token; how to print
that as a table. Does not know: how tokens are chosen (sampling.py), response shapes
beyond its own dict.

Each choice gets `"trace": [step, ...]`, one dict per generated token:

    {"step": 0, "coin": 0.1387, "interval": [0.05, 0.46], "token": 11, "text": ",",
     "stages": [{"stage": "raw",         "chosen": 0.41, "top": [[",", 11, 0.41], ...]},
                {"stage": "logit_bias",  "chosen": 0.41, "top": [...]},
                {"stage": "penalties",   "chosen": 0.41, "top": [...]},
                {"stage": "temperature", "chosen": 0.43, "top": [...]},
                {"stage": "top_p",       "chosen": 0.47, "top": [...],
                 "kept": 12, "mass": 0.9013}]}

- "top": the TOP (5) most probable tokens after the stage, [display text, id, p].
- "chosen": the chosen token's probability after the stage, also when it is not in "top".
- Probabilities after a logits stage are the softmax of the logits at that point (so
  "temperature" shows the tempered distribution).
- top_p stage: "kept" = how many tokens `select` could pick (p > 0 after top_p),
  "mass" = their total probability before renormalisation (>= top_p unless one token).
- "interval" = [lo, hi): the chosen token's slice of [0, 1) in `select`'s walk (kept
  tokens by ascending id, cumulative probability / total); the coin lies in it
  (up to float rounding at the edges).
- Greedy (temperature 0): "coin" and "interval" are null, the stages stop after
  "penalties", and there are no "kept"/"mass".
- "candidate" (when the decode loop passes it): the candidate index of the coin
  `rng.coin(seed, candidate, step)`; with best_of > n it tells which candidate a
  returned choice was.

`format_trace(choice["trace"])` renders it.
"""

from __future__ import annotations

from types import ModuleType

import numpy as np

from refcomplete.kernels import fmath
from refcomplete.sampling import top_k

TOP = 5


def record(tokenizer, step: int, z: np.ndarray, seen: list, coin: float | None,
           token: int, candidate: int | None = None, ops: ModuleType = fmath) -> dict:
    """One step's trace: z the raw float64 logits, seen [(stage, x after it)]; ops the
    backend's exp and sum (kernels.fmath or its compiled twin: the same bits)."""
    stages = [("raw", ops.softmax(z))]
    stages += [(name, x if name == "top_p" else ops.softmax(x)) for name, x in seen
               if name != "softmax"]       # softmax shows the same as "temperature"
    rows = []
    for name, p in stages:
        row = {"stage": name, "chosen": float(p[token]),
               "top": [[tokenizer.display(i), i, float(p[i])]
                       for i in top_k(p, TOP, positive=True, ops=ops)]}
        if name == "top_p":
            before = dict(seen)["softmax"]
            kept = p > 0
            row["kept"] = int(np.count_nonzero(kept))
            row["mass"] = float(ops.sum(before[kept]))
        rows.append(row)
    out = {"step": step}
    if candidate is not None:
        out["candidate"] = candidate
    out.update({"coin": coin, "interval": None if coin is None else interval(seen[-1][1], token),
                "token": token, "text": tokenizer.display(token), "stages": rows})
    return out


def interval(p: np.ndarray, token: int) -> list[float]:
    """[lo, hi): the slice of [0, 1) whose coins make `select(p, coin)` pick `token`.

    select walks the tokens with p > 0 by ascending id and picks the first whose
    cumulative sum exceeds coin * total, so token t owns [cum before t, cum at t) / total.

    >>> interval(np.array([0.0, 0.5, 0.3, 0.2]), 2)
    [0.5, 0.8]
    """
    ids = np.flatnonzero(p > 0)
    c = np.cumsum(p[ids])
    k = int(np.searchsorted(ids, token))
    lo = c[k - 1] if k else 0.0
    return [float(lo / c[-1]), float(c[k] / c[-1])]


def format_trace(steps: list[dict], width: int = 14, stages: tuple[str, ...] | None = None) -> str:
    """A readable table: one block per step, one column per stage (or only `stages`).

    step 0  coin 0.1387 in [0.0512, 0.4612) -> ','   top_p kept 12 (mass 0.901)
      raw                   top_p
      *','            0.412 *','            0.470
       ' the'         0.200  ' the'         0.230
      ...
    "top_p kept" appears when top_p removed tokens. The chosen token is starred; when it
    is outside a column's top 5 an extra row shows its probability in every column (`…`
    where it is in the top).
    """
    lines = []
    for s in steps:
        cols = [st for st in s["stages"] if stages is None or st["stage"] in stages]
        coin = "greedy" if s["coin"] is None else f"coin {s['coin']:.4f}"
        if s.get("interval"):
            coin += " in [{:.4f}, {:.4f})".format(*s["interval"])
        head = f"step {s['step']}  {coin} -> {s['text']!r}"
        if "candidate" in s:
            head = f"candidate {s['candidate']}  " + head
        tp = next((st for st in s["stages"] if "kept" in st), None)
        if tp is not None and tp["mass"] < 1 - 1e-9:        # top_p removed something
            head += f"   top_p kept {tp['kept']} (mass {tp['mass']:.3f})"
        lines.append(head)
        lines.append("  " + "".join(f"{st['stage']:<{width + 8}}" for st in cols))
        for r in range(max((len(st["top"]) for st in cols), default=0)):
            cells = []
            for st in cols:
                if r < len(st["top"]):
                    text, token, p = st["top"][r]
                    mark = "*" if token == s["token"] else " "
                    cells.append(f"{mark}{_short(text, width):<{width}}{p:6.3f} ")
                else:
                    cells.append(" " * (width + 8))
            lines.append("  " + "".join(cells))
        if any(s["token"] not in [t for _, t, _ in st["top"]] for st in cols):
            cells = []
            for st in cols:
                if s["token"] in [t for _, t, _ in st["top"]]:
                    cells.append(f"{'…':<{width + 8}}")
                else:
                    cells.append(f"*{_short(s['text'], width):<{width}}{st.get('chosen', 0.0):6.3f} ")
            lines.append("  " + "".join(cells))
    return "\n".join(lines)


def _short(text: str, width: int) -> str:
    shown = repr(text)
    return shown if len(shown) <= width else shown[: width - 1] + "…"
