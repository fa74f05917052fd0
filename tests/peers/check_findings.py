"""Compare the findings of a `refcomplete compare --report` with a committed expectation.

A finding is "CHECK: OUTCOME" of one case (the report's non-"ok" findings, each once);
the expectation holds, per case, its verdict and the sorted list of its findings. Any
difference, on either side (the server's or compare's), is printed as a diff and fails.

    python tests/peers/check_findings.py REPORT.json EXPECT.json            # check
    python tests/peers/check_findings.py REPORT.json EXPECT.json --update   # re-record
    python tests/peers/check_findings.py REPORT.json EXPECT.json --table T.md

The table (markdown) lists each case that is not a plain pass with its verdict and
findings, the deciding one first, with the detail of the first of each.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def findings(report: dict) -> dict:
    """{case: {"result": verdict, "findings": sorted ["check: outcome", ...]}}."""
    out = {}
    for case in report["cases"]:
        keys = sorted({f"{f['check']}: {f['outcome']}" for f in case["findings"]
                       if f["outcome"] != "ok"})
        out[case["name"]] = {"result": case["result"], "findings": keys}
    return out


def diff(got: dict, want: dict, report: dict) -> list[str]:
    detail = {(c["name"], f"{f['check']}: {f['outcome']}"): f.get("detail", "")
              for c in report["cases"] for f in c["findings"]}
    lines = []
    for name in sorted(set(got) | set(want), key=lambda n: (n not in want, n)):
        g, w = got.get(name), want.get(name)
        if g == w:
            continue
        if g is None:
            lines.append(f"  {name}: in the expectation, missing from this run")
            continue
        if w is None:
            lines.append(f"  {name}: a new case ({g['result']})")
            w = {"result": None, "findings": []}
        if g["result"] != w["result"]:
            lines.append(f"  {name}: result {g['result']} (expected {w['result']})")
        for k in sorted(set(w["findings"]) - set(g["findings"])):
            lines.append(f"  {name}: - {k}   (expected, not found now)")
        for k in sorted(set(g["findings"]) - set(w["findings"])):
            d = detail.get((name, k), "")
            lines.append(f"  {name}: + {k}   (new)" + (f"\n        {d[:400]}" if d else ""))
    return lines


def table(report: dict) -> str:
    """Markdown: case | result | findings (deciding first) | detail of the first."""
    rows = ["| case | result | findings | first detail |", "|---|---|---|---|"]
    for c in report["cases"]:
        bad = [f for f in c["findings"] if f["outcome"] != "ok"]
        if not bad:
            continue
        bad.sort(key=lambda f: not f.get("decides"))
        names, seen = [], set()
        for f in bad:
            k = f"{f['outcome']}" + ("" if f.get("decides") else " (w)")
            if k not in seen:
                seen.add(k)
                names.append(k)
        det = (bad[0].get("detail") or "").replace("|", "\\|").replace("\n", " ")
        det = det if len(det) <= 160 else det[:159] + "\u2026"
        rows.append(f"| {c['name']} | {c['result'].upper() if c['result'] == 'fail' else c['result']}"
                    f" | {', '.join(names)} | {bad[0]['check']}: {det} |")
    res = [c["result"] for c in report["cases"]]
    rows.append("")
    rows.append(f"{res.count('pass')} pass, {res.count('dialect')} dialect, {res.count('fail')} "
                f"FAIL of {len(res)} cases. (w): a waived dialect.")
    return "\n".join(rows)


def main_with(report_path: Path, expect_path: Path, update=False, meta=None, table_path=None) -> int:
    report = json.loads(Path(report_path).read_text(encoding="utf-8"))
    got = findings(report)
    if table_path:
        Path(table_path).write_text(table(report) + "\n", encoding="utf-8")
        print(f"findings table: {table_path}")
    res = [c["result"] for c in report["cases"]]
    print(f"this run: {res.count('pass')} pass, {res.count('dialect')} dialect, "
          f"{res.count('fail')} fail of {len(res)} cases")
    if update:
        doc = {**(meta or {}), "cases": got}
        Path(expect_path).write_text(json.dumps(doc, indent=1, ensure_ascii=False) + "\n",
                                     encoding="utf-8")
        print(f"wrote the expectation {expect_path}")
        return 0
    if not Path(expect_path).is_file():
        print(f"FAIL: no expectation {expect_path}; record one with --update", file=sys.stderr)
        return 1
    expect = json.loads(Path(expect_path).read_text(encoding="utf-8"))
    problems = []
    if meta:
        for k in ("peer", "sampling", "compare"):
            if k in meta and expect.get(k) != meta[k]:
                problems.append(f"  {k}: {meta[k]!r} now, {expect.get(k)!r} in the expectation")
    problems += diff(got, expect["cases"], report)
    if problems:
        print(f"FAIL: the findings differ from {expect_path}\n"
              f"(- expected but not found, + found but not expected; a change on either side,\n"
              f" the server's or compare's. If it is intended, re-record with --update.)",
              file=sys.stderr)
        print("\n".join(problems), file=sys.stderr)
        return 1
    n = sum(len(v["findings"]) for v in got.values())
    print(f"OK: {n} findings over {len(got)} cases equal {expect_path.name}")
    return 0


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("report")
    ap.add_argument("expect")
    ap.add_argument("--update", action="store_true")
    ap.add_argument("--table")
    a = ap.parse_args()
    sys.exit(main_with(Path(a.report), Path(a.expect), a.update, table_path=a.table))
