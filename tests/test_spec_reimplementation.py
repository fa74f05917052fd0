"""A clean-room reimplementation of SEMANTICS 1-3 and 11, written from docs/semantics.md
alone, in plain Python floats: no numpy, no `math` transcendental, nothing from
refcomplete's sampling code. Given the model's float32 logits at each step, it must
reproduce create()'s tokens and every logprob bit for bit.

Only the logits come from refcomplete (the model is not what this checks); everything
between logits and response is rebuilt here: logit_bias, penalties, temperature, softmax,
top_p, select, coins, raw and processed logprobs, top-k, our exp/log and sums.
"""

from __future__ import annotations

import struct

import pytest

from refcomplete._paths import weights_dir

BUNDLED = "gpt2-tiny-shakespeare"
pytestmark = pytest.mark.skipif(not (weights_dir() / BUNDLED / "model.safetensors").is_file(),
                                reason="the bundled model has not landed")
M64 = (1 << 64) - 1


# -- §11: exp, log, sum -------------------------------------------------------------------

def f64(bits: int) -> float:
    return struct.unpack("<d", struct.pack("<Q", bits & M64))[0]


def bits(x: float) -> int:
    return struct.unpack("<Q", struct.pack("<d", x))[0]


LN2_HI, LN2_LO, INV_LN2 = f64(0x3FE62E42FEE00000), f64(0x3DEA39EF35793C76), f64(0x3FF71547652B82FE)
P1, P2, P3 = f64(0x3FC555555555553E), f64(0xBF66C16C16BEBD93), f64(0x3F11566AAF25DE2C)
P4, P5 = f64(0xBEBBBD41C5D26BF1), f64(0x3E66376972BEA4D0)
OVER, UNDER = f64(0x40862E42FEFA39EF), f64(0xC0874910D52D3051)
LG = [f64(b) for b in (0x3FE5555555555593, 0x3FD999999997FA04, 0x3FD2492494229359, 0x3FCC71C51D8E78AF,
                       0x3FC7466496CB03DE, 0x3FC39A09D078C69F, 0x3FC2F112DF3E5244)]
INF = float("inf")


def floor(x: float) -> float:
    i = int(x)                          # truncates toward zero
    return float(i - 1) if x < i else float(i)


def pow2(j: float) -> float:
    return f64((int(j) + 1023) << 52)


def exp(x: float) -> float:
    if x != x:
        return x
    if x > OVER:
        return INF
    if x < UNDER:
        return 0.0
    k = floor(x * INV_LN2 + 0.5)
    hi = x - k * LN2_HI
    lo = k * LN2_LO
    r = hi - lo
    t = r * r
    c = r - t * (P1 + t * (P2 + t * (P3 + t * (P4 + t * P5))))
    y = 1.0 - ((lo - (r * c) / (2.0 - c)) - hi)
    h = floor(k / 2)
    return (y * pow2(k - h)) * pow2(h)


def log(x: float) -> float:
    if x != x or x < 0:
        return float("nan")
    if x == 0:
        return -INF
    if x == INF:
        return INF
    k0 = 0
    if x < 2.0 ** -1022:
        x, k0 = x * 2.0 ** 54, -54
    b = bits(x)
    hx = b >> 32
    frac = hx & 0x000FFFFF
    i = (frac + 0x95F64) & 0x100000
    m = f64(((frac | (i ^ 0x3FF00000)) << 32) | (b & 0xFFFFFFFF))
    k = float(k0 + (hx >> 20) - 1023 + (i >> 20))
    f = m - 1.0
    s = f / (2.0 + f)
    z = s * s
    w = z * z
    t1 = w * (LG[1] + w * (LG[3] + w * LG[5]))
    t2 = z * (LG[0] + w * (LG[2] + w * (LG[4] + w * LG[6])))
    R = t2 + t1
    hfsq = (0.5 * f) * f
    return k * LN2_HI - ((hfsq - (s * (hfsq + R) + k * LN2_LO)) - f)


def fsum8(xs: list[float]) -> float:
    lane = [0.0] * 8
    for i, x in enumerate(xs):
        lane[i % 8] = lane[i % 8] + x
    return ((lane[0] + lane[1]) + (lane[2] + lane[3])) + ((lane[4] + lane[5]) + (lane[6] + lane[7]))


# -- §3: coins ------------------------------------------------------------------------------

def mix(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & M64
    return x ^ (x >> 31)


def coin(seed: int, candidate: int, step: int) -> float:
    s = mix(mix(mix(seed & M64) ^ candidate) ^ step)
    return (s >> 11) * 2.0 ** -53


# -- §1-2: one step ---------------------------------------------------------------------------

def softmax(z: list[float]) -> list[float]:
    m = max(z)
    e = [exp(v - m) for v in z]
    s = fsum8(e)
    return [v / s for v in e]


def log_softmax(z: list[float]) -> list[float]:
    m = max(z)
    lse = log(fsum8([exp(v - m) for v in z]))
    return [(v - m) - lse for v in z]


def top_k(x: list[float], k: int, positive: bool = False) -> list[int]:
    order = sorted(range(len(x)), key=lambda i: (-x[i], i))
    if positive:
        order = [i for i in order if x[i] > 0]
    return order[:k]


def step(logits: list[float], req: dict, counts: dict, u: float):
    """(token, logprob, top) for one step of one candidate."""
    raw = list(logits)
    z = list(logits)
    for key, b in (req.get("logit_bias") or {}).items():
        z[int(key)] = z[int(key)] + b
    fp, pp = req.get("frequency_penalty", 0.0), req.get("presence_penalty", 0.0)
    for tok, c in counts.items():
        z[tok] = (z[tok] - fp * c) - (pp if c > 0 else 0.0)
    T = req.get("temperature", 1.0)
    processed = req.get("logprobs_mode") == "processed"
    if T == 0:
        token = max(range(len(z)), key=lambda i: (z[i], -i))
        dist = log_softmax(z if processed else raw)
        src = dist
        ids = [token] + top_k(src, req["logprobs"])
        return token, [(i, dist[i]) for i in ids]
    z = [v / T for v in z]
    p = softmax(z)
    top_p = req.get("top_p", 1.0)
    if top_p < 1:
        order = sorted(range(len(p)), key=lambda i: (-p[i], i))
        kept, before = [], 0.0
        for n, i in enumerate(order):
            if n == 0 or before < top_p:
                kept.append(i)
            before = before + p[i]
        kept.sort()
        s = fsum8([p[i] for i in kept])
        q = [0.0] * len(p)
        for i in kept:
            q[i] = p[i] / s
        p = q
    ids = [i for i in range(len(p)) if p[i] > 0]
    cums, total = [], 0.0
    for i in ids:
        total = total + p[i]
        cums.append(total)
    x = u * total
    token = next((i for i, c in zip(ids, cums) if c > x), ids[-1])
    if processed:
        chosen = [token] + top_k(p, req["logprobs"], positive=True)
        return token, [(i, log(p[i])) for i in chosen]
    dist = log_softmax(raw)
    return token, [(i, dist[i]) for i in [token] + top_k(dist, req["logprobs"])]


# -- the check --------------------------------------------------------------------------------

REQUESTS = [
    dict(prompt="ROMEO:", max_tokens=5, temperature=0.8, top_p=0.9, presence_penalty=0.6,
         frequency_penalty=0.4, logprobs=3, seed=7, n=2, logit_bias={"11": 2.5, "198": -3.0}),
    dict(prompt="JULIET: O", max_tokens=4, temperature=1.2, top_p=0.5, logprobs=2, seed=12,
         logprobs_mode="processed", frequency_penalty=1.0),
    dict(prompt="First Citizen:", max_tokens=4, temperature=0, logprobs=4, presence_penalty=1.5,
         logprobs_mode="processed", logit_bias={"13": 4.0}),
    dict(prompt="KING:", max_tokens=4, temperature=0, logprobs=5),
    dict(prompt="To be", max_tokens=4, temperature=1.0, logprobs=1, seed=-3),
]


@pytest.fixture(scope="module")
def model():
    from refcomplete.registry import load_model
    return load_model(BUNDLED)


def check(model, req):
    """Rebuild every choice of create(req) from the logits; assert each token and logprob."""
    from refcomplete.completions import Completions
    r = Completions(models={BUNDLED: model}).create(model=BUNDLED, **req)
    prompt = model.tokenizer.encode(req["prompt"])
    for choice in r["choices"]:
        cand = choice["index"]
        tokens, counts = [], {}
        lp = choice["logprobs"]
        for s in range(len(lp["tokens"])):
            logits = [float(v) for v in model.logits(prompt + tokens)[-1]]  # float32 -> exact float
            u = coin(req.get("seed", 0), cand, s)
            token, entries = step(logits, req, counts, u)
            assert model.tokenizer.display(token) == lp["tokens"][s], (cand, s)
            assert entries[0][1] == lp["token_logprobs"][s], (cand, s)          # exact, not close
            shown = {model.tokenizer.display(i): v for i, v in entries}
            assert shown == lp["top_logprobs"][s], (cand, s)
            tokens.append(token)
            counts[token] = counts.get(token, 0) + 1


@pytest.mark.parametrize("req", REQUESTS, ids=[f"req{i}" for i in range(len(REQUESTS))])
def test_create_is_reproduced_bit_for_bit(model, req):
    check(model, req)


@pytest.mark.parametrize("broken", ["exp", "log", "fsum8"])
def test_a_one_ulp_difference_is_caught(model, broken, monkeypatch):
    """The check is not vacuous: our exp, log or sum off by one ulp fails it."""
    assert exp(1.0) == 2.7182818284590455 and log(10.0) == 2.302585092994046
    assert coin(42, 3, 7) == 0.6686949404958634
    assert fsum8([1e16, 1.0, -1e16, 1.0, 3.0, 0.5, 0.25, 2.0, 1.0]) == 5.75
    good = globals()[broken]
    monkeypatch.setitem(globals(), broken, lambda x: good(x) * (1 + 2.0 ** -52))
    with pytest.raises(AssertionError):
        check(model, REQUESTS[0])
