"""Benchmark: `refcomplete.create()` end to end against HF transformers `generate()`, one run.

P1: 124M decode tok/s at batch 1, greedy, via create()        (>= 2.0x HF generate)
P2: 124M decode tok/s at batch 8 (n=8, top_p 0.9) via create() (>= 3.0x HF generate)
P3: bundled tiny model, create() with top_p, penalties, logprobs=5
    vs HF generate() with the same processors                   (>= 5x)
P5: fresh process, `refcomplete complete` first token, warm Numba cache (<= 1.0 s)

The 124M model is a random-weight checkpoint with GPT-2 124M shapes (fixed seed; the
same speed as the real weights). Prints ratios, the BLAS kernel and versions.
    python bench/bench_create.py [--tokens 64] [--json out.json]
Needs torch==2.13.0 and transformers (`make crosscheck` installs them).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_runtime import best_of, checkpoint, facts  # noqa: E402

from refcomplete._paths import weights_dir  # noqa: E402

TINY = weights_dir() / "gpt2-tiny-shakespeare"
PROMPT = "ROMEO:\nBut, soft! what light through yonder window breaks?\n"


def ours(model: str, tokens: int, **kw) -> float:
    import refcomplete

    req = dict(model=model, prompt=PROMPT, max_tokens=tokens, **kw)
    refcomplete.create(**{**req, "max_tokens": 2})                 # load + compile
    rows = kw.get("n", 1)

    def run():
        r = refcomplete.create(**req)
        assert r["usage"]["completion_tokens"] == rows * tokens, r["usage"]  # no early EOS/stop

    return rows * tokens / best_of(run, 2)


def hf(model_dir: Path, tokens: int, rows=1, sample=False, top_p=None, temperature=None,
       penalties=None, logprobs=False) -> float:
    import torch
    from transformers import GPT2LMHeadModel, LogitsProcessor, LogitsProcessorList

    from refcomplete.tokenizer import get_tokenizer

    class OpenAIPenalties(LogitsProcessor):
        """OpenAI's documented penalty: z - c * frequency - (c > 0) * presence, c over generated tokens."""

        def __init__(self, start, presence, frequency):
            self.start, self.presence, self.frequency = start, presence, frequency

        def __call__(self, input_ids, scores):
            gen = input_ids[:, self.start:]
            counts = torch.zeros_like(scores).scatter_add_(1, gen, torch.ones_like(gen, dtype=scores.dtype))
            return scores - counts * self.frequency - (counts > 0).to(scores.dtype) * self.presence

    torch.set_num_threads(os.cpu_count() or 1)
    model = GPT2LMHeadModel.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    ids = torch.tensor([get_tokenizer().encode(PROMPT)] * rows)
    procs = LogitsProcessorList([OpenAIPenalties(ids.shape[1], *penalties)] if penalties else [])

    def run():
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=tokens,
                                 min_new_tokens=tokens, do_sample=sample, top_p=top_p, temperature=temperature,
                                 top_k=None, logits_processor=procs, pad_token_id=50256,
                                 return_dict_in_generate=logprobs, output_logits=logprobs)
            if logprobs:  # the same work as logprobs=5: log_softmax and the top 5 per step
                for step in out.logits:
                    torch.log_softmax(step.double(), dim=-1).topk(5)

    run()
    return rows * tokens / best_of(run, 2)


def first_token_fresh_process() -> float:
    cli = Path(sys.executable).parent / "refcomplete"
    cmd = [str(cli), "complete", "ROMEO:", "--max-tokens", "1", "--temperature", "0"]
    subprocess.run(cmd, check=True, capture_output=True)           # warm the Numba cache
    return best_of(lambda: subprocess.run(cmd, check=True, capture_output=True), 3)


TINY_KW = dict(temperature=0.8, top_p=0.9, presence_penalty=0.5, frequency_penalty=0.5, logprobs=5, seed=1)
MEASURES = {  # name -> (label, target, ours, HF); each side runs in its own process
    "P1": ("P1 124M batch 1 greedy (tok/s)", 2.0,
           lambda n: ours(str(checkpoint()), n, temperature=0), lambda n: hf(checkpoint(), n)),
    "P2": ("P2 124M n=8 top_p 0.9 (tok/s)", 3.0,
           lambda n: ours(str(checkpoint()), n, n=8, top_p=0.9, seed=1),
           lambda n: hf(checkpoint(), n, rows=8, sample=True, top_p=0.9)),
    "P3": ("P3 tiny, top_p+penalties+logprobs=5 (tok/s)", 5.0,
           lambda n: ours(str(TINY), n, **TINY_KW),
           lambda n: hf(TINY, n, sample=True, top_p=0.9, temperature=0.8, penalties=(0.5, 0.5), logprobs=True)),
}


def measure(name: str, side: str, tokens: int) -> float:
    """One side of one measure, in a fresh process (torch's and Numba's thread pools
    would otherwise compete)."""
    out = subprocess.run([sys.executable, __file__, "--one", name, side, "--tokens", str(tokens)],
                         capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--one", nargs=2, metavar=("MEASURE", "SIDE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        name, side = args.one
        print(MEASURES[name][2 if side == "ours" else 3](args.tokens))
        return
    checkpoint()
    rows = {}
    for name, (label, target, _, _) in MEASURES.items():
        rows[label] = (measure(name, "ours", args.tokens), measure(name, "hf", args.tokens), target)
    from machine import header

    print(header())
    print(f"\n{json.dumps(facts())}\n")
    print("| measure | refcomplete | HF transformers | ratio | target |")
    print("|---|---|---|---|---|")
    for label, (a, b, target) in rows.items():
        print(f"| {label} | {a:.1f} | {b:.1f} | {a / b:.2f}x | >= {target}x |")
    p5 = first_token_fresh_process()
    print(f"\nP5 fresh process, `refcomplete complete --max-tokens 1` wall time: {p5:.2f} s (target <= 1.0 s)")
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "p5_s": p5, "facts": facts()}, indent=2))


if __name__ == "__main__":
    main()
