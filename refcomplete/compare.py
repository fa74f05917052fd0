"""`refcomplete compare`: replay a golden suite against any OpenAI-compatible server.

Knows: the command line, which suite to use (--suite, or the suite shipped for the
bundled model), the run over a suite's cases and the messages for what stops a run (no
suite, bad --extra-body, no server). The judging lives in compare_judge.py, the HTTP
side in compare_replay.py, the names and the report in compare_findings.py.

    refcomplete compare --base-url http://127.0.0.1:8000 --model gpt2-tiny-shakespeare
    refcomplete compare --base-url http://127.0.0.1:8080 --model tiny --suite bundled \\
        --extra-body '{"repeat_penalty": 1.0, "top_k": 0, "min_p": 0}' \\
        --waive text_offset_zero --report out.json
    refcomplete compare --base-url http://127.0.0.1:8000 --model gpt2-tiny-shakespeare --sampling

`--sampling` adds the sampling-conformance cases (compare_sampling.py): the server's own
draws against our exact processed distribution.

Each case ends "pass", "dialect" (only named differences, all waived) or "fail" (a
mismatch, a named failure, or a named difference not waived). Exit status 1 if any case
fails, 2 if the run could not be made.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from refcomplete.compare_findings import (DIALECTS, FAILURES, CaseResult, Finding, report,
                                          summary, text_diff)
from refcomplete.compare_judge import DEFAULT_SHAPE_RMS_TOL, DEFAULT_SHAPE_TOL, DEFAULT_SHIFT_TOL, Judge
from refcomplete.compare_replay import Replayer, Unreachable, fold, sdk_validate

__all__ = ["DIALECTS", "FAILURES", "CaseResult", "Finding", "Judge", "Replayer", "Unreachable",
           "fold", "report", "run", "sdk_validate", "summary", "text_diff", "bundled_suite"]

BUNDLED_MODEL = "gpt2-tiny-shakespeare"


class Stopped(Exception):
    """The run stopped before its last case; `results` holds the cases done."""

    def __init__(self, message: str, results: list):
        super().__init__(message)
        self.results = results


def bundled_suite() -> Path:
    """The bundled model's suite: refcomplete/golden_suite/ in a wheel, tests/golden/ in a
    source checkout."""
    from refcomplete._paths import golden_suite_dir

    return golden_suite_dir()


def is_bundled(model: str) -> bool:
    """The model name (or a path, or a .gguf file, named after it) is the bundled model's."""
    name = Path(model.rstrip("/")).name
    return name in (BUNDLED_MODEL, BUNDLED_MODEL + ".gguf")


def run(suite_dir, replayer: Replayer, progress=True) -> list[CaseResult]:
    """Replay every case of a suite; a progress bar goes to stderr, or to the file
    `progress` (None: silent). Raises Stopped when the server cannot be reached."""
    from refcomplete.golden import load_suite

    progress = sys.stderr if progress is True else progress
    _, cases = load_suite(suite_dir)
    results = []
    for i, case in enumerate(cases, 1):
        if progress is not None:
            bar = "#" * (30 * i // len(cases))
            progress.write(f"\r[{bar:<30}] {i}/{len(cases)} {case['name'][:28]:<28}")
            progress.flush()
        try:
            results.append(replayer.run_case(case))
        except Unreachable as exc:
            if progress is not None:
                progress.write("\n")
            where = f"after {len(results)} of {len(cases)} cases" if results else "at the first case"
            raise Stopped(f"cannot reach {replayer.base_url} ({where}): {exc}", results) from exc
    if progress is not None:
        progress.write("\n")
    return results


def add_subcommand(subparsers) -> None:
    """Register `refcomplete compare` on the CLI's subparsers."""
    p = subparsers.add_parser("compare", help="replay a golden suite against a server")
    p.add_argument("--base-url", required=True, help="e.g. http://127.0.0.1:8000 (with or without /v1)")
    p.add_argument("--model", required=True, help="the model name to send")
    p.add_argument("--suite", help="a suite directory, or 'bundled' (the default when --model "
                   f"names {BUNDLED_MODEL})")
    p.add_argument("--api-key")
    p.add_argument("--report", help="write a JSON report here")
    p.add_argument("--shift-tol", type=float, default=DEFAULT_SHIFT_TOL,
                   help="tolerance on a position's common logprob shift (mean over the top-k)")
    p.add_argument("--shape-tol", type=float, default=DEFAULT_SHAPE_TOL,
                   help="tolerance on each logprob once its position's common shift is removed")
    p.add_argument("--shape-rms-tol", type=float, default=DEFAULT_SHAPE_RMS_TOL,
                   help="tolerance on the root mean square of those over a case's entries")
    p.add_argument("--atol", type=float, help="set --shift-tol, --shape-tol and --shape-rms-tol")
    p.add_argument("--tie-margin", type=float, default=5e-3,
                   help="greedy divergence where the golden top-2 margin is below this is near_tie")
    p.add_argument("--extra-body", default="{}",
                   help="a JSON object merged into every valid request (the case's fields win)")
    p.add_argument("--extra-body-on-errors", action="store_true",
                   help="send --extra-body with the invalid-request cases too")
    p.add_argument("--waive", action="append", default=[], choices=sorted(DIALECTS),
                   help="a named difference to accept (repeatable)")
    p.add_argument("--waive-all-dialects", action="store_true")
    p.add_argument("--sampling", action="store_true",
                   help="also test the server's sampler against our exact distribution "
                   "(compare_sampling.py; about a minute on the bundled model)")
    p.add_argument("--sampling-only", action="store_true", help="--sampling without the suite")
    p.add_argument("--sampling-scale", type=float, default=1.0,
                   help="scale the number of draws per sampling case (default 1: 2000 first "
                   "tokens, 300 paths)")
    p.add_argument("--sampling-seeds", choices=("vary", "none"), default="vary",
                   help="vary: a different seed per request; none: send no seed")
    p.add_argument("--sampling-alpha", type=float, default=0.01,
                   help="the sampling checks' false-alarm rate over the whole run (Holm)")
    p.add_argument("--sampling-model", help="our model for the exact distribution (default: "
                   "the bundled model if --model names it, else --model itself)")
    p.set_defaults(handler=_run)


def _fail(message: str) -> int:
    print(f"refcomplete compare: error: {message}", file=sys.stderr)
    return 2


def _suite(args) -> tuple[Path | None, str]:
    """(suite directory, how it was chosen), or (None, why there is none)."""
    if args.suite not in (None, "bundled"):
        path = Path(args.suite)
        return (path, f"suite {path}") if (path / "manifest.json").is_file() else \
            (None, f"no golden suite at {path} (no manifest.json); write one with "
                   f"`refcomplete golden --model MODEL --out {path}`")
    if args.suite is None and not is_bundled(args.model):
        return None, (f"--model {args.model!r} is not the bundled {BUNDLED_MODEL}: give --suite "
                      f"DIR (a suite written by `refcomplete golden`), or --suite bundled if "
                      f"the server serves {BUNDLED_MODEL} under another name")
    path = bundled_suite()
    if not (path / "manifest.json").is_file():
        return None, f"the bundled suite is missing from this installation ({path})"
    return path, f"the bundled {BUNDLED_MODEL} suite ({path})"


def _sampling_model(args):
    """(our model for --sampling, "") or (None, why not)."""
    from refcomplete.registry import load_model

    name = args.sampling_model or (BUNDLED_MODEL if is_bundled(args.model) else args.model)
    try:
        return load_model(name), ""
    except Exception as exc:   # noqa: BLE001 (a missing or damaged model: one line)
        return None, (f"--sampling needs our copy of the served model: cannot load {name!r} "
                      f"({type(exc).__name__}: {exc}); give --sampling-model NAME_OR_PATH")


def _sampling_cases(args, suite, model) -> tuple[list | None, str, str]:
    """(cases, where they come from, why not): the suite's distribution cases (sampling.json,
    written by `refcomplete golden` for its model), or None: build them from our model;
    why not, if the suite's model is not the one --sampling uses."""
    from refcomplete.compare_sampling import cases_from_json
    from refcomplete.golden import load_sampling

    if suite is None and args.suite not in (None, "bundled"):
        suite = Path(args.suite)                    # --sampling-only with --suite DIR
        if not (suite / "manifest.json").is_file():
            return None, "", (f"--suite {args.suite}: no golden suite there (no manifest.json); "
                              "write one with `refcomplete golden`, or leave out --suite "
                              "to build the sampling cases from the model")
    found = load_sampling(suite) if suite is not None else None
    if found is None:
        return None, "cases built from that model", ""
    manifest, items = found
    if manifest.get("model_sha256") != model.weights_sha256:
        return None, "", (f"the suite's sampling cases were written for "
                          f"{manifest.get('model')!r} (weights sha256 "
                          f"{str(manifest.get('model_sha256'))[:12]}...), but --sampling uses "
                          f"{model.name!r} ({model.weights_sha256[:12]}...): give "
                          f"--sampling-model the suite's model")
    return cases_from_json(items, args.sampling_scale), f"{len(items)} cases from {suite}", ""


def _run(args) -> int:
    base = args.base_url.rstrip("/")
    base = base[:-3] if base.endswith("/v1") else base
    waived = set(DIALECTS) if args.waive_all_dialects else set(args.waive)
    try:
        extra = json.loads(args.extra_body)
    except ValueError as exc:
        return _fail(f"--extra-body is not valid JSON ({exc}): {args.extra_body!r}")
    if not isinstance(extra, dict):
        return _fail(f"--extra-body must be a JSON object, not {args.extra_body!r}")
    sampling = args.sampling or args.sampling_only
    suite, how = (None, "") if args.sampling_only else _suite(args)
    if suite is None and not args.sampling_only:
        return _fail(how)
    model = scases = None
    if sampling:
        model, why = _sampling_model(args)
        if model is None:
            return _fail(why)
        try:
            scases, where, why = _sampling_cases(args, suite, model)
        except (OSError, ValueError, TypeError, KeyError) as exc:   # a damaged sampling.json
            return _fail(f"cannot read the suite's sampling cases: {exc}")
        if why:
            return _fail(why)
    if args.report and not Path(args.report).resolve().parent.is_dir():
        return _fail(f"the directory of --report ({Path(args.report).parent}) does not exist")
    shift = args.shift_tol if args.atol is None else args.atol
    shape = args.shape_tol if args.atol is None else args.atol
    rms = args.shape_rms_tol if args.atol is None else args.atol
    if suite is not None:
        print(f"using {how}", file=sys.stderr)
    rep = Replayer(base, args.model, args.api_key, extra, Judge(shift, shape, args.tie_margin, rms),
                   extra_on_errors=args.extra_body_on_errors)
    results = []
    try:
        if suite is not None:
            results = run(suite, rep)
        if sampling:
            from refcomplete.compare_sampling import run_sampling

            print(f"sampling: our distribution from {model.name}; {where}", file=sys.stderr)
            results += run_sampling(model, rep, args.sampling_scale, args.sampling_seeds,
                                    args.sampling_alpha, cases=scases)
    except Stopped as exc:
        return _fail(str(exc))
    except Unreachable as exc:
        return _fail(f"cannot reach {base} (sampling): {exc}")
    except (OSError, ValueError) as exc:       # an unreadable or tampered suite
        return _fail(f"cannot read the suite: {exc}")
    print(summary(results, waived))
    if args.report:
        with open(args.report, "w", encoding="utf-8") as f:
            json.dump(report(results, waived, base_url=base, model=args.model,
                             suite=None if suite is None else str(suite),
                             shift_tol=shift, shape_tol=shape, shape_rms_tol=rms), f, indent=1)
    return 1 if any(r.verdict(waived) == "fail" for r in results) else 0
