"""`refcomplete golden`: write a versioned suite of golden requests and responses for a model.

Knows: which requests cover the endpoint's parameters and edges (the CASES table), how a
response is normalised so a regenerated suite is byte-identical, and the suite's files.
Does not know: how responses are produced (completions.py) or compared (compare.py).

    refcomplete golden --model gpt2-tiny-shakespeare --out tests/golden

Layout of a suite directory:
    manifest.json          suite_version, model name, weights sha256, tokenizer sha256,
                           package and contract versions, n_ctx, the case list (name,
                           file, kind, tags, sha256 of the file)
    cases/NN_name.json     {"name", "kind", "tags", "request", "expect"}
    sampling.json          the distribution cases of `compare --sampling` for this model
                           (prompts, sampling fields with the top_p edges and biased tokens
                           read off its distribution, draws); its sha256 is in the manifest

kind "completion": expect is the response; "stream": expect is the list of chunks a
client sees; "error": expect is {"status", "error": {...}}. Requests carry no "model":
the replaying side names it. Normalised: every `id` is "cmpl-golden" and every
`created` is 0; everything else is exactly what `create()` returned. Sampled cases
always carry a seed. A few requests are derived from the model's own greedy output
(a stop string spanning a token boundary, a ban on the greedy first token), so they
exercise the edge whatever the weights.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from refcomplete._version import CONTRACT_VERSION, __version__
from refcomplete.completions import Completions
from refcomplete.errors import CompletionError

SUITE_VERSION = 1
SAMPLING_FILE = "sampling.json"
PROMPTS = ["ROMEO:", "JULIET:\nO Romeo, Romeo!", "First Citizen:\nBefore we proceed any further",
           "To be, or not to be"]
UTF8_PROMPT = "\u2019Tis caf\u00e9 \u6771\u4eac \U0001F600"   # ’ (447 + 247), é, CJK, emoji
G = {"temperature": 0}


def cases(model) -> list[tuple[str, str, list[str], dict]]:
    """(name, kind, tags, request) for every case; some requests use the model's greedy output."""
    tok, n_ctx = model.tokenizer, model.n_ctx
    api = Completions({"m": model})
    first = api.create(model="m", prompt=PROMPTS[0], max_tokens=24, logprobs=0, **G)
    span = _spanning_stop(first, len(PROMPTS[0]))
    greedy_first = _token_id(tok, first["choices"][0]["logprobs"]["tokens"][0])
    ids = tok.encode(PROMPTS[2])
    out = []
    add = lambda name, kind, tags, **req: out.append((name, kind, tags, req))
    for i, p in enumerate(PROMPTS):
        add(f"greedy_{i}", "completion", ["greedy"], prompt=p, max_tokens=24, logprobs=5, **G)
    add("greedy_no_logprobs", "completion", ["greedy"], prompt=PROMPTS[1], **G)
    add("default_prompt", "completion", ["greedy"], max_tokens=8, logprobs=1, **G)
    add("echo_score_max0_lp0", "completion", ["echo", "echo_max0", "logprobs0"],
        prompt=PROMPTS[2], echo=True, max_tokens=0, logprobs=0, **G)
    add("echo_score_max0_lp5", "completion", ["echo", "echo_max0"],
        prompt=PROMPTS[1], echo=True, max_tokens=0, logprobs=5, **G)
    add("echo_max1_lm_eval", "completion", ["echo", "greedy"],
        prompt=ids, echo=True, max_tokens=1, logprobs=1, seed=1234, **G)
    add("echo_greedy", "completion", ["echo", "greedy"], prompt=PROMPTS[3], echo=True,
        max_tokens=6, logprobs=2, **G)
    add("logprobs_0", "completion", ["greedy", "logprobs0"], prompt=PROMPTS[3], max_tokens=8,
        logprobs=0, **G)
    add("logprobs_above_5", "completion", ["greedy", "logprobs_over5"], prompt=PROMPTS[0],
        max_tokens=4, logprobs=9, **G)
    add("stop_spans_tokens", "completion", ["greedy", "stop"], prompt=PROMPTS[0], max_tokens=24,
        logprobs=2, stop=span, **G)
    add("stop_list", "completion", ["greedy", "stop"], prompt=PROMPTS[0], max_tokens=24,
        logprobs=1, stop=["\u00a7\u00a7", span, "zzzz"], **G)
    add("utf8_split_echo", "completion", ["echo", "echo_max0", "utf8"], prompt=UTF8_PROMPT,
        echo=True, max_tokens=0, logprobs=2, **G)
    add("utf8_split_generated", "completion", ["greedy", "utf8", "logit_bias"],
        prompt="\u2019", max_tokens=3, logprobs=1, logit_bias={"447": 100}, **G)
    add("logit_bias_ban", "completion", ["greedy", "logit_bias"], prompt=PROMPTS[0],
        max_tokens=8, logprobs=2, logit_bias={str(greedy_first): -100, "50256": -100}, **G)
    add("logit_bias_force", "completion", ["greedy", "logit_bias"], prompt=PROMPTS[1],
        max_tokens=4, logprobs=2, logit_bias={"262": 100}, **G)
    add("eos_forced", "completion", ["greedy", "logit_bias", "eos"], prompt=PROMPTS[3],
        max_tokens=4, logprobs=1, logit_bias={"50256": 100}, **G)
    add("penalties", "completion", ["greedy", "penalties"], prompt=PROMPTS[0], max_tokens=24,
        logprobs=1, frequency_penalty=1.5, presence_penalty=0.8, **G)
    add("n_greedy", "completion", ["greedy", "greedy_n"], prompt=PROMPTS[3], max_tokens=6,
        n=3, **G)
    add("prompt_list", "completion", ["greedy"], prompt=PROMPTS[:3], max_tokens=8, logprobs=1, **G)
    add("token_ids", "completion", ["greedy", "token_ids"], prompt=ids, max_tokens=8, logprobs=1,
        **G)
    add("token_id_lists", "completion", ["greedy", "token_ids"],
        prompt=[ids, tok.encode(PROMPTS[0])], max_tokens=6, **G)
    add("seeded_sampling", "completion", ["sampled"], prompt=PROMPTS[0], max_tokens=16,
        temperature=0.8, top_p=0.9, seed=1234, logprobs=2)
    add("seeded_n", "completion", ["sampled"], prompt=PROMPTS[1], max_tokens=12, n=3,
        temperature=1.0, seed=42)
    add("best_of", "completion", ["sampled", "best_of"], prompt=PROMPTS[0], max_tokens=10,
        best_of=3, temperature=1.0, seed=7, logprobs=0)
    add("best_of_n2", "completion", ["sampled", "best_of"], prompt=PROMPTS[3], max_tokens=8,
        n=2, best_of=4, temperature=1.2, seed=3)
    add("stream_include_usage", "stream", ["greedy", "stream"], prompt=PROMPTS[1], max_tokens=10,
        logprobs=1, stream=True, stream_options={"include_usage": True}, **G)
    add("stream_stop_holdback", "stream", ["greedy", "stream", "stop"], prompt=PROMPTS[0],
        max_tokens=24, stop=span, stream=True, **G)
    add("stream_utf8", "stream", ["greedy", "stream", "utf8", "logit_bias"], prompt="\u2019",
        max_tokens=3, logit_bias={"447": 100}, stream=True, **G)
    bad = lambda name, tags=(), **req: add(name, "error", ["invalid", *tags], **req)
    bad("bad_temperature", prompt="x", temperature=3)
    bad("bad_top_p", prompt="x", top_p=1.5)
    bad("bad_presence_penalty", prompt="x", presence_penalty=-3)
    bad("bad_n_zero", prompt="x", n=0)
    bad("max_tokens_0_no_echo", prompt="x", max_tokens=0)
    bad("max_tokens_0_no_logprobs", prompt="x", max_tokens=0, echo=True)
    bad("context_overflow", prompt="x", max_tokens=n_ctx)
    bad("best_of_below_n", ["best_of"], prompt="x", n=3, best_of=2)
    bad("stream_best_of", ["best_of"], prompt="x", best_of=2, stream=True)
    bad("five_stops", prompt="x", stop=["a", "b", "c", "d", "e"])
    bad("unknown_parameter", prompt="x", top_k=5)
    bad("empty_prompt", prompt="")
    bad("token_id_out_of_range", prompt=[model.n_vocab])
    bad("logit_bias_bad_key", prompt="x", logit_bias={str(model.n_vocab): 1})
    bad("logit_bias_bad_value", prompt="x", logit_bias={"11": 101})
    bad("suffix", prompt="x", suffix="y")
    bad("stream_options_without_stream", prompt="x", stream_options={"include_usage": True})
    bad("unknown_model", ["model"], prompt="x", model="no-such-model")
    return out


def _spanning_stop(response: dict, prompt_len: int) -> str:
    """A 4-character stop string of the greedy text whose first occurrence straddles a
    token boundary (so the cut lands inside a token); "\\n" if there is none."""
    c = response["choices"][0]
    text, offs = c["text"], [o - prompt_len for o in c["logprobs"]["text_offset"]]
    for b in offs[1:]:
        s = text[b - 2:b + 2]
        f = text.find(s)
        if len(s) == 4 and s.strip() and f >= 2 and any(f < x < f + 4 for x in offs):
            return s
    return "\n"


def _token_id(tok, display: str) -> int:
    return next(i for i in range(tok.n_vocab) if tok.display(i) == display)


def normalise(obj):
    """Replace the fields that change on every call: id -> "cmpl-golden", created -> 0."""
    if isinstance(obj, list):
        return [normalise(x) for x in obj]
    if isinstance(obj, dict) and obj.get("object") == "text_completion":
        return {**obj, "id": "cmpl-golden", "created": 0}
    return obj


def run_case(api: Completions, model_name: str, kind: str, request: dict):
    """The normalised expectation of one case, from `api` (a Completions)."""
    req = {"model": model_name, **request}
    try:
        result = api.create(**req)
        result = list(result) if kind == "stream" else result
    except CompletionError as exc:
        return {"status": exc.status, **exc.to_dict()}
    return normalise(result)


def dumps(obj) -> str:
    return json.dumps(obj, indent=1, ensure_ascii=False) + "\n"


def generate_suite(model, model_name: str, out_dir) -> Path:
    """Write the suite for a loaded model (served as model_name) into out_dir."""
    out = Path(out_dir)
    (out / "cases").mkdir(parents=True, exist_ok=True)
    for old in (out / "cases").glob("*.json"):
        old.unlink()
    api = Completions({model_name: model})
    entries = []
    for i, (name, kind, tags, request) in enumerate(cases(model)):
        expect = run_case(api, model_name, kind, request)
        if kind != "error" and "error" in expect:
            raise RuntimeError(f"golden case {name} failed: {expect}")
        if kind == "error" and "error" not in expect:
            raise RuntimeError(f"golden case {name} should be rejected but was answered")
        text = dumps({"name": name, "kind": kind, "tags": tags, "request": request,
                      "expect": expect})
        rel = f"cases/{i:02d}_{name}.json"
        (out / rel).write_text(text, encoding="utf-8")
        entries.append({"name": name, "file": rel, "kind": kind, "tags": tags,
                        "sha256": hashlib.sha256(text.encode()).hexdigest()})
    from refcomplete.compare_sampling import build_cases, cases_to_json
    from refcomplete.tokenizer import R50K_SHA256
    text = dumps({"cases": cases_to_json(build_cases(model))})
    (out / SAMPLING_FILE).write_text(text, encoding="utf-8")
    manifest = {"suite_version": SUITE_VERSION, "generator": "refcomplete golden",
                "package_version": __version__, "contract_version": CONTRACT_VERSION,
                "model": model_name, "model_sha256": model.weights_sha256,
                "tokenizer_sha256": R50K_SHA256, "n_ctx": model.n_ctx, "cases": entries,
                "sampling": {"file": SAMPLING_FILE,
                             "sha256": hashlib.sha256(text.encode()).hexdigest()}}
    (out / "manifest.json").write_text(dumps(manifest), encoding="utf-8")
    return out


def load_suite(suite_dir) -> tuple[dict, list[dict]]:
    """(manifest, cases) of a suite directory, checking each file's sha256."""
    root = Path(suite_dir)
    manifest = _manifest(root)
    return manifest, [json.loads(_listed(root, entry)) for entry in manifest["cases"]]


def load_sampling(suite_dir) -> tuple[dict, list[dict]] | None:
    """(manifest, the distribution cases as written) of a suite, its sha256 checked; None
    for a suite without them (written before they were)."""
    root = Path(suite_dir)
    manifest = _manifest(root)
    entry = manifest.get("sampling")
    if not entry:
        return None
    return manifest, json.loads(_listed(root, entry))["cases"]


def _manifest(root: Path) -> dict:
    """A suite's manifest.json, refused unless of the suite_version this refcomplete reads."""
    manifest = json.loads((root / "manifest.json").read_text(encoding="utf-8"))
    if manifest.get("suite_version") != SUITE_VERSION:
        raise ValueError(f"{root}: suite_version {manifest.get('suite_version')}, "
                         f"this refcomplete reads {SUITE_VERSION}")
    return manifest


def _listed(root: Path, entry: dict) -> str:
    """The text of a file the manifest lists ({"file", "sha256"}), refused if it differs."""
    text = (root / entry["file"]).read_text(encoding="utf-8")
    if hashlib.sha256(text.encode()).hexdigest() != entry["sha256"]:
        raise ValueError(f"{root / entry['file']}: sha256 differs from the manifest")
    return text


def add_subcommand(subparsers) -> None:
    """Register `refcomplete golden` on the CLI's subparsers."""
    p = subparsers.add_parser("golden", help="write a golden suite of requests and responses")
    p.add_argument("--model", default="gpt2-tiny-shakespeare",
                   help="model name or directory (the suite names it as given)")
    p.add_argument("--name", help="the model name written into the suite (default: --model)")
    p.add_argument("--out", required=True, help="suite directory to (re)write")
    from refcomplete.server import add_backend_flag
    add_backend_flag(p)
    p.set_defaults(handler=_run)


def _run(args) -> int:
    from refcomplete.registry import load_model

    out = generate_suite(load_model(args.model, getattr(args, "backend", None)), args.name or args.model,
                         args.out)
    manifest = json.loads((out / "manifest.json").read_text())
    print(f"wrote {len(manifest['cases'])} cases and the distribution cases of "
          f"`compare --sampling` to {out}")
    return 0
