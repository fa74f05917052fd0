"""The `refcomplete` command: completions in a terminal.

Knows: argument parsing and terminal rendering. Does not know: anything create() does.

    refcomplete complete "ROMEO:" --max-tokens 60 --temperature 0.8 --seed 1   # streams
    refcomplete complete "JULIET:" --max-tokens 12 --logprobs 3    # token-by-token view
    refcomplete complete "Hi" --json                                # the raw response
    refcomplete models                                              # what can be loaded

Bad requests print OpenAI's error message and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import math
import sys

from refcomplete.errors import CompletionError

DEFAULT_MODEL = "gpt2-tiny-shakespeare"


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="refcomplete", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="command", required=True)
    c = sub.add_parser("complete", help="complete a prompt (streams text as generated)")
    c.add_argument("prompt")
    c.add_argument("--model", default=DEFAULT_MODEL)
    c.add_argument("--max-tokens", type=int, default=16)
    c.add_argument("--temperature", type=float, default=1.0)
    c.add_argument("--top-p", type=float, default=1.0)
    c.add_argument("--n", type=int, default=1)
    c.add_argument("--best-of", type=int)
    c.add_argument("--seed", type=int)
    c.add_argument("--stop", action="append", help="a stop string (repeatable, up to 4)")
    c.add_argument("--logprobs", type=int, help="show each token with N alternatives")
    c.add_argument("--echo", action="store_true")
    c.add_argument("--presence-penalty", type=float, default=0.0)
    c.add_argument("--frequency-penalty", type=float, default=0.0)
    c.add_argument("--trace", action="store_true", help="show the sampler's work per step")
    c.add_argument("--json", action="store_true", help="print the raw JSON response")
    from refcomplete.server import add_backend_flag
    add_backend_flag(c)
    sub.add_parser("models", help="list the models that can be loaded")
    from refcomplete import compare, export_gguf, golden, server  # serve, golden, compare, export
    for module in (server, golden, compare, export_gguf):
        module.add_subcommand(sub)
    from refcomplete import batch; batch.add_subcommand(sub)  # noqa: E702  refcomplete batch
    return ap


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if getattr(args, "handler", None) is not None:
        return args.handler(args)
    if args.command == "models":
        from refcomplete.registry import list_models
        for name in list_models():
            print(name)
        return 0
    request = {"model": args.model, "prompt": args.prompt, "max_tokens": args.max_tokens,
               "temperature": args.temperature, "top_p": args.top_p, "n": args.n,
               "best_of": args.best_of, "seed": args.seed, "logprobs": args.logprobs,
               "stop": args.stop, "echo": args.echo or None, "trace": args.trace or None,
               "presence_penalty": args.presence_penalty,
               "frequency_penalty": args.frequency_penalty}
    import functools

    from refcomplete import completions
    create = completions.create if args.backend is None else completions.Completions(
        functools.partial(completions.registry_loader, backend=args.backend)).create
    try:
        if args.json or args.logprobs is not None or args.trace or args.n > 1 or args.best_of:
            response = create(**request)
            print(json.dumps(response, indent=2, ensure_ascii=False) if args.json
                  else render(response))
        else:
            for chunk in create(**request, stream=True):
                for choice in chunk["choices"]:
                    sys.stdout.write(choice["text"])
                    sys.stdout.flush()
            sys.stdout.write("\n")
    except CompletionError as e:
        print(f"error ({e.status} {e.param or ''}): {e.message}", file=sys.stderr)
        return 2
    return 0


def render(response: dict) -> str:
    """Each choice's text; with logprobs a token table, with trace the sampler steps."""
    from refcomplete.trace import format_trace
    out = []
    for c in response["choices"]:
        if len(response["choices"]) > 1:
            out.append(f"--- choice {c['index']} ({c['finish_reason']})")
        out.append(c["text"])
        if c["logprobs"] is not None:
            out.append(logprobs_table(c["logprobs"]))
        if c.get("trace"):
            out.append(format_trace(c["trace"]))
    return "\n".join(out)


def logprobs_table(lp: dict) -> str:
    """A header row, then one line per token: its text offset, the token, its logprob and
    probability, then the alternatives.

    offset  token            logprob   prob  | alternatives
         0  'ROMEO'           -0.105  90.0%  | ' the' 4.1%  ',' 2.2%
    """
    lines = [f"{'offset':>6}  {'token':<16} {'logprob':>7} {'prob':>6}  | alternatives"]
    tops = lp["top_logprobs"] or [None] * len(lp["tokens"])
    for off, tok, v, top in zip(lp["text_offset"], lp["tokens"], lp["token_logprobs"], tops):
        head = f"{off:6d}  {tok!r:<16.16}"
        if v is None:
            lines.append(f"{head}      (first prompt token: no logprob)")
            continue
        alts = "  ".join(f"{t!r} {100 * math.exp(p):.1f}%" for t, p in (top or {}).items()
                         if t != tok)
        lines.append(f"{head} {v:7.3f} {100 * math.exp(v):5.1f}%" + (f"  | {alts}" if alts else ""))
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
