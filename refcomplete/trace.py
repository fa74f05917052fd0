"""`trace=True`: what happened at each decode step, for people studying the sampler.

Knows: how to summarise the sampling pipeline's intermediates (sampling.run with
trace=True) as the top candidates and their probabilities after each stage, plus the
coin and the chosen token; how to print that as a table. Does not know: how tokens
are chosen (sampling.py), response shapes beyond its own dict.

Each choice gets `"trace": [step, ...]`, one dict per generated token:

    {"step": 0, "coin": 0.1387, "token": 11, "text": ",",
     "stages": [{"stage": "raw",         "top": [[",", 11, 0.41], [" the", 262, 0.2], ...]},
                {"stage": "logit_bias",  "top": [...]},
                {"stage": "penalties",   "top": [...]},
                {"stage": "temperature", "top": [...]},
                {"stage": "top_p",       "top": [...]}]}

Probabilities after a logits stage are the softmax of the logits at that point (so
"temperature" shows the tempered distribution); "coin" is null when greedy (the
stages stop after "penalties"). `format_trace(choice["trace"])` renders it.
"""

from __future__ import annotations

import numpy as np

from refcomplete.sampling import softmax, top_k

TOP = 5


def record(tokenizer, step: int, z: np.ndarray, seen: list, coin: float | None,
           token: int) -> dict:
    """One step's trace: z the raw float64 logits, seen [(stage, x after it)]."""
    stages = [("raw", softmax(z))]
    stages += [(name, x if name == "top_p" else softmax(x)) for name, x in seen
               if name != "softmax"]       # softmax shows the same as "temperature"
    return {"step": step, "coin": coin, "token": token, "text": tokenizer.display(token),
            "stages": [{"stage": name, "top": [[tokenizer.display(i), i, float(p[i])]
                                               for i in top_k(p, TOP, positive=True)]}
                       for name, p in stages]}


def format_trace(steps: list[dict], width: int = 14) -> str:
    """A readable table: one block per step, one column per stage.

    step 0  coin 0.1387 -> ','
      raw              logit_bias       ...
      ','      0.412   ','      0.412
    """
    lines = []
    for s in steps:
        coin = "greedy" if s["coin"] is None else f"coin {s['coin']:.4f}"
        lines.append(f"step {s['step']}  {coin} -> {s['text']!r}")
        names = [st["stage"] for st in s["stages"]]
        lines.append("  " + "".join(f"{n:<{width + 8}}" for n in names))
        for r in range(max(len(st["top"]) for st in s["stages"])):
            cells = []
            for st in s["stages"]:
                if r < len(st["top"]):
                    text, token, p = st["top"][r]
                    mark = "*" if token == s["token"] else " "
                    cells.append(f"{mark}{_short(text, width):<{width}}{p:6.3f} ")
                else:
                    cells.append(" " * (width + 8))
            lines.append("  " + "".join(cells))
    return "\n".join(lines)


def _short(text: str, width: int) -> str:
    shown = repr(text)
    return shown if len(shown) <= width else shown[: width - 1] + "…"
