"""An A/B of `refcomplete serve` between two versions of the code: the working tree (B)
and a git revision (A), side by side on one machine, in alternated rounds.

Why a script: over HTTP this host's speed drifts by more than most changes are worth, so
a change is only evidence when both versions run in the same minutes, alternated, and
when each side provably runs its own code. Putting a bare checkout of the old revision on
PYTHONPATH is not enough: its refcomplete/ has no kernels/ (pyproject.toml maps
refcomplete.kernels to the top-level kernels/), so the editable install's finder supplies
refcomplete.kernels, and the weights, from the working tree. Here A's server runs through a
launcher that removes that finder and imports refcomplete from a worktree of the revision
(`git worktree add`, with refcomplete/kernels, weights and golden_suite linked as
pyproject.toml maps them), and says which files it imported; the script stops if either
side's are not its own.

Each round sends the same load to A, then to B (the order alternating between rounds):
`--clients` streaming clients, `--requests-per-client` requests each (max_tokens 8, a
seed per request), bench_server.py's load. Prints each round's tokens/s, the B/A ratio
per pair, the median ratio and in how many pairs B was ahead, with a sign test's
two-sided p-value (how often a coin would split the pairs at least this unevenly); and
checks that both sides streamed the same bytes (apart from id and created).

    python bench/ab_server.py REV [--rounds 10] [--clients 32] [--flags="--workers 2"]
                              [--a-flags="--loop asyncio"] [--b-flags=...]
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import runpy
import shlex
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LINKS = {"refcomplete/kernels": "../kernels", "refcomplete/weights": "../weights",
         "refcomplete/golden_suite": "../tests/golden"}


def launch(tree: str, argv: list[str]) -> None:
    """Run `-m MODULE ARGS` with refcomplete imported from `tree`, not from the install."""
    sys.meta_path[:] = [f for f in sys.meta_path if "__editable__" not in type(f).__module__]
    sys.path_importer_cache.clear()
    sys.path.insert(0, tree)
    import refcomplete
    import refcomplete.kernels
    print(f"ab_server: refcomplete from {refcomplete.__file__}, kernels from "
          f"{refcomplete.kernels.__file__}", file=sys.stderr, flush=True)
    assert argv[0] == "-m", argv
    sys.argv = [argv[1], *argv[2:]]
    runpy.run_module(argv[1], run_name="__main__", alter_sys=True)


def worktree(rev: str, where: Path) -> Path:
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "-q", "--detach", str(where), rev],
                   check=True)
    for link, target in LINKS.items():
        (where / link).symlink_to(target)
    return where


def imported_from(log: str) -> str:
    lines = [x for x in log.splitlines() if x.startswith("ab_server: refcomplete from ")]
    return lines[0] if lines else ""


def sign_test(ahead: int, pairs: int) -> float:
    """Two-sided p-value of `ahead` of `pairs` under a fair coin."""
    k = min(ahead, pairs - ahead)
    tail = sum(math.comb(pairs, i) for i in range(k + 1)) / 2 ** pairs
    return min(1.0, 2 * tail)


def main() -> int:
    if len(sys.argv) > 2 and sys.argv[1] == "--launch":
        launch(sys.argv[2], sys.argv[3:])
        return 0
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("rev", help="the git revision to compare the working tree against (A)")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--requests-per-client", type=int, default=8)
    ap.add_argument("--flags", default="", help="extra `serve` flags for both sides")
    ap.add_argument("--a-flags", default="", help="... for A only (REV = HEAD: an A/B of a flag)")
    ap.add_argument("--b-flags", default="", help="... for B only")
    args = ap.parse_args()
    if args.rounds < 1 or args.clients < 1 or args.requests_per_client < 1:
        ap.error("--rounds, --clients and --requests-per-client must be at least 1")
    rev = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--verify", args.rev + "^{commit}"],
                         capture_output=True, text=True)
    if rev.returncode:
        ap.error(f"not a revision: {args.rev}")
    sha = rev.stdout.strip()

    sys.path.insert(0, str(ROOT / "tests"))
    sys.path.insert(0, str(ROOT / "bench"))
    from bench_server import MODEL, load
    from machine import header
    from test_server_security import serve_process

    print(header())
    dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True).stdout.strip()
    print(f"A: {sha[:10]} (a worktree); B: the working tree at "
          f"{subprocess.run(['git', '-C', str(ROOT), 'rev-parse', '--short=10', 'HEAD'], capture_output=True, text=True).stdout.strip()}"
          f"{' with uncommitted changes' if dirty else ''}")
    print(f"refcomplete serve {args.flags or '(default flags)'}; A also {args.a_flags or '-'}, "
          f"B also {args.b_flags or '-'}; {MODEL}, {args.clients} streaming clients x "
          f"{args.requests_per_client} requests, max_tokens 8, {args.rounds} alternated rounds")
    flags = shlex.split(args.flags)
    tmp = Path(tempfile.mkdtemp(prefix="refcomplete-ab-"))
    tree = worktree(sha, tmp / "a")
    try:
        old = (sys.executable, str(Path(__file__).resolve()), "--launch", str(tree))
        with serve_process(MODEL, flags=flags + shlex.split(args.a_flags), python=old,
                           timeout=900) as a, \
                serve_process(MODEL, flags=flags + shlex.split(args.b_flags), timeout=900) as b:
            a_from = imported_from(a.output())
            if str(tree) not in a_from:
                print(f"A does not run the revision's code: {a_from or a.output()[-500:]}")
                return 2
            b_check = subprocess.run([sys.executable, "-c", "import refcomplete.kernels as k, "
                                      "refcomplete as r; print(r.__file__, k.__file__)"],
                                     capture_output=True, text=True, cwd=tempfile.gettempdir())
            if str(tmp) in b_check.stdout or str(ROOT) not in b_check.stdout:
                print(f"B does not run the working tree's code: {b_check.stdout}{b_check.stderr}")
                return 2
            print(f"A imports {a_from.split('from ', 1)[1]}\nB imports {b_check.stdout.strip()}")
            for srv in (a, b):                  # warm up: Numba caches, threads, pool pages
                asyncio.run(load(srv.port, args.clients, 2, 10_000))
            rates, same = {"A": [], "B": []}, True
            print("\n| round | A tok/s | B tok/s | B / A |\n|---|---|---|---|")
            for r in range(args.rounds):
                answers = {}
                for side in ("AB" if r % 2 == 0 else "BA"):
                    srv = a if side == "A" else b
                    wall, _, tokens, answers[side] = asyncio.run(
                        load(srv.port, args.clients, args.requests_per_client, 0))
                    rates[side].append(tokens / wall)
                same &= answers["A"] == answers["B"]
                print(f"| {r + 1} | {rates['A'][-1]:.0f} | {rates['B'][-1]:.0f} | "
                      f"{rates['B'][-1] / rates['A'][-1]:.3f} |", flush=True)
            for srv in (a, b):
                assert srv.alive() and srv.log_errors() == [], srv.output()[-2000:]
    finally:
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)],
                       check=False)
        os.rmdir(tmp) if tmp.exists() and not any(tmp.iterdir()) else None
    ratios = [b_ / a_ for a_, b_ in zip(rates["A"], rates["B"])]
    ahead = sum(x > 1 for x in ratios)
    print(f"\nmedian tok/s A {statistics.median(rates['A']):.0f}, B {statistics.median(rates['B']):.0f}; "
          f"median B / A {statistics.median(ratios):.3f} (pairs {min(ratios):.3f}-{max(ratios):.3f}); "
          f"B ahead in {ahead} of {len(ratios)} pairs, sign test p = {sign_test(ahead, len(ratios)):.3f}")
    print(f"streams byte-identical between A and B (apart from id, created): {same}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
