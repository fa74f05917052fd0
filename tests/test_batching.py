"""Cross-request batching (refcomplete.batching) gives the bits of sessions stepped alone.

- the fact it rests on: a row attended with no shared prefix, its prompt's keys and values
  copied into its own cache at entries 0..T-1, gives the logits of runtime.Session's shared
  prefix + row cache, bit for bit, whatever other rows share the step;
- BatchingModel sessions, stepped from many threads at once in random orders, give each
  session's logits of the plain model, bit for bit; so does create() over many threads;
- solo sessions (pool full), slots returned when sessions are collected, errors handed back.
"""

from __future__ import annotations

import gc
import random
import threading
import time

import numpy as np
import pytest

from refcomplete.batching import BatchingModel
from refcomplete.checkpoint import load_checkpoint
from refcomplete.completions import Completions
from refcomplete.registry import load_model
from refcomplete.runtime import GPT2Model


@pytest.fixture(scope="module", params=["tiny", "tiny-numpy", "bundled"])
def model(request, tiny_dir):
    if request.param == "tiny":
        return GPT2Model(load_checkpoint(tiny_dir), name="tiny")
    if request.param == "tiny-numpy":            # the strict NumPy twins: the same rule
        return GPT2Model(load_checkpoint(tiny_dir), name="tiny", backend="numpy")
    return load_model("gpt2-tiny-shakespeare")


def alone(model, prompt, tokens_per_row, all_positions=False):
    """Prefill and step a plain session row by row, one row per step: [prefill, [steps]]."""
    sess = model.session(prompt, rows=len(tokens_per_row), max_new_tokens=max(map(len, tokens_per_row)) + 1)
    head = sess.prefill(all_positions)
    out = [[sess.step([r], [t])[0] for t in toks] for r, toks in enumerate(tokens_per_row)]
    return head, out


def test_prompt_in_the_row_cache_is_the_shared_prefix_bit_for_bit(model):
    """The fact batching rests on, with GPT2Model's own pieces: rows of three prompts in
    one pool, n_pre = 0, stepped together in one batch, equal the sessions stepped alone."""
    rng = np.random.default_rng(0)
    cfg = model.config
    L, H, D, S = cfg.n_layer, cfg.n_head, cfg.n_embd // cfg.n_head, model.n_ctx
    prompts = [list(rng.integers(0, 50257, T)) for T in (1, 7, 30)]
    steps = 5
    gen = [list(rng.integers(0, 50257, steps)) for _ in prompts]
    expect = [alone(model, p, [g])[1][0] for p, g in zip(prompts, gen)]
    R = 5                                                   # slots 1, 3, 4 used; 0, 2 junk
    kp = [np.full((R, H, D, S), np.nan, np.float32) for _ in range(L)]
    vp = [np.full((R, H, S, D), np.nan, np.float32) for _ in range(L)]
    none_k = [np.zeros((H, D, 0), np.float32)] * L
    none_v = [np.zeros((H, 0, D), np.float32)] * L
    slots = np.array([4, 1, 3])
    for p, s in zip(prompts, slots):                        # each prompt alone, as Session does
        sess = model.session(p, rows=1, max_new_tokens=1)
        sess.prefill()
        for layer in range(L):
            kp[layer][s, :, :, :len(p)] = sess.k_pre[layer]
            vp[layer][s, :, :len(p)] = sess.v_pre[layer]
    n = np.array([len(p) for p in prompts])
    for t in range(steps):
        tokens = np.array([g[t] for g in gen])
        x = model._embed(tokens, n)
        x = model._layers(x, none_k, none_v, 0, kp, vp, slots, n.copy())
        z = model._head(x)
        n += 1
        for i in range(3):
            assert np.array_equal(z[i], expect[i][t]), (i, t)


def test_batched_sessions_from_threads_match_alone(model):
    rng = np.random.default_rng(1)
    cases = []
    for i in range(12):
        prompt = list(rng.integers(0, 50257, int(rng.integers(1, 20))))
        rows = int(rng.integers(1, 4))
        toks = [list(rng.integers(0, 50257, int(rng.integers(1, 9)))) for _ in range(rows)]
        cases.append((prompt, toks, bool(i % 3 == 0)))
    expect = [alone(model, p, toks, ap) for p, toks, ap in cases]
    batched = BatchingModel(model, max_rows=24, window=0.002)
    got = [None] * len(cases)

    def run(i, seed):
        prompt, toks, ap = cases[i]
        order = random.Random(seed)
        sess = batched.session(prompt, rows=len(toks), max_new_tokens=max(map(len, toks)) + 1)
        head = sess.prefill(ap)
        out = [[] for _ in toks]
        left = [list(t) for t in toks]
        while any(left):                    # random subsets of rows per step
            rows = [r for r in range(len(toks)) if left[r] and order.random() < 0.7]
            if not rows:
                continue
            z = sess.step(rows, [left[r].pop(0) for r in rows])
            for r, zr in zip(rows, z):
                out[r].append(zr)
        got[i] = (head, out)

    for round_ in range(2):
        threads = [threading.Thread(target=run, args=(i, 10 * round_ + i)) for i in range(len(cases))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        for (h0, o0), (h1, o1) in zip(expect, got):
            assert np.array_equal(h0, h1)
            assert all(np.array_equal(a, b) for r0, r1 in zip(o0, o1) for a, b in zip(r0, r1))
            assert [len(r) for r in o0] == [len(r) for r in o1]
    assert batched.stats["forwards"] < sum(len(t) for _, toks, _ in cases for t in toks)
    gc.collect()
    assert sorted(batched._free) == list(range(24)) and batched._holders == batched._expected == 0


def test_a_full_pool_runs_sessions_solo_with_the_same_bits(model):
    batched = BatchingModel(model, max_rows=2, slot_wait=0.05)
    a = batched.session([1, 2, 3], rows=2, max_new_tokens=4)
    a.prefill()
    b = batched.session([5, 6], rows=1, max_new_tokens=4)     # no slot left: solo
    head = b.prefill()
    assert batched.stats["solo"] == 1 and b._solo is not None
    h0, o0 = alone(model, [5, 6], [[7, 8]])
    assert np.array_equal(head, h0)
    assert np.array_equal(b.step([0], [7])[0], o0[0][0])
    assert np.array_equal(a.step([1], [9])[0], alone(model, [1, 2, 3], [[0], [9]])[1][1][0])
    del a
    gc.collect()
    assert sorted(batched._free) == [0, 1]
    assert np.array_equal(b.step([0], [8])[0], o0[0][1])


def test_errors_come_back_and_batching_goes_on(model):
    batched = BatchingModel(model, max_rows=4)
    with pytest.raises(ValueError):
        batched.session([], rows=1, max_new_tokens=1)
    sess = batched.session([1, 2], rows=1, max_new_tokens=1)
    with pytest.raises(RuntimeError):
        sess.step([0], [3])
    sess.prefill()
    sess.step([0], [3])
    with pytest.raises(ValueError):
        sess.step([0], [4])                                    # capacity 1
    with pytest.raises(IndexError):
        batched._step(np.array([0]), np.array([10 ** 9]))      # a bad token id, in the thread
    assert np.array_equal(batched.logits([1, 2, 3]), model.logits([1, 2, 3]))


def test_the_lead_passes_between_threads_through_errors(model):
    # 16 threads at once, some of whose steps and calls fail: every thread gets its own
    # answer or error (none hangs), and the lead ends free with nothing left queued
    batched = BatchingModel(model, max_rows=32, window=0.002)
    results = {}

    def boom():
        raise KeyError("in a call")

    def run(i):
        try:
            sess = batched.session([1 + i, 2], rows=1, max_new_tokens=6)
            sess.prefill()
            for k in range(4):
                if i % 5 == 1 and k == 2:
                    batched._step(sess.slots, np.array([10 ** 9]))   # fails in the forward
                if i % 5 == 2 and k == 1:
                    batched._call(boom)
                sess.step([0], [3 + k])
            results[i] = "ok"
        except (IndexError, KeyError) as exc:
            results[i] = type(exc).__name__

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(16)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 30
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    assert not any(t.is_alive() for t in threads)
    assert results == {i: "IndexError" if i % 5 == 1 else "KeyError" if i % 5 == 2 else "ok"
                       for i in range(16)}
    assert not batched._leader and not batched._work and not batched._calls


REQUESTS = [
    dict(prompt="ROMEO:", max_tokens=8, temperature=0),
    dict(prompt="To be", max_tokens=6, seed=3, logprobs=3),
    dict(prompt=["JULIET:", "O"], max_tokens=5, n=2, seed=1, echo=True, logprobs=2),
    dict(prompt="Hark", max_tokens=7, best_of=3, n=2, seed=5, top_p=0.9),
    dict(prompt="KING", max_tokens=9, seed=9, stop=["\n", "e"], temperature=1.3),
    dict(prompt="A", max_tokens=0, echo=True, logprobs=1),
]


def strip(r):
    return {k: v for k, v in r.items() if k not in ("id", "created")}


def test_create_from_threads_is_the_serial_answer():
    model = load_model("gpt2-tiny-shakespeare")
    name = "gpt2-tiny-shakespeare"
    serial = Completions({name: model})
    expect = [strip(serial.create(model=name, **r)) for r in REQUESTS]
    api = Completions({name: BatchingModel(model, max_rows=16, window=0.003)})
    got = {}

    def run(j):
        i = j % len(REQUESTS)
        if j % 2:
            chunks = list(api.create(model=name, stream=True, **REQUESTS[i])) if REQUESTS[i].get(
                "best_of", 1) == REQUESTS[i].get("n", 1) else None
            got[j] = ("stream", chunks)
        else:
            got[j] = ("plain", strip(api.create(model=name, **REQUESTS[i])))

    threads = [threading.Thread(target=run, args=(j,)) for j in range(4 * len(REQUESTS))]
    random.Random(0).shuffle(threads)
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    stream_ref = {i: list(Completions({name: model}).create(model=name, stream=True, **r))
                  for i, r in enumerate(REQUESTS) if r.get("best_of", 1) == r.get("n", 1)}
    for j, (kind, value) in got.items():
        i = j % len(REQUESTS)
        if kind == "plain":
            assert value == expect[i], (j, REQUESTS[i])
        elif value is not None:
            assert [strip(c) for c in value] == [strip(c) for c in stream_ref[i]], j
    assert len(got) == 4 * len(REQUESTS)


def test_an_idle_pool_gives_its_pages_back(model):
    batched = BatchingModel(model, max_rows=4, release_after=0)    # at once
    sess = batched.session([1, 2, 3], rows=2, max_new_tokens=3)
    sess.prefill()
    sess.step([0, 1], [4, 5])
    assert batched._k[0][sess.slots[0], :, :, :4].any()         # written entries
    other = batched.session([7], rows=1, max_new_tokens=2)
    other.prefill()
    del sess
    gc.collect()
    assert batched._k[0][:, :, :, :4].any()                      # a holder is left: kept
    del other
    gc.collect()
    assert batched._holders == 0 and not any(k.any() for k in batched._k)   # released: zeros
    again = batched.session([1, 2, 3], rows=1, max_new_tokens=2)
    assert np.array_equal(again.prefill(), model.session([1, 2, 3], 1, 2).prefill())


def test_an_idle_pool_keeps_its_pages_for_release_after_seconds(model):
    """Timing-independent: the idle time is long enough that no host is slow enough to pass
    it between two sessions; then the idle time is made to have passed and the pending
    check runs (as its timer would)."""
    batched = BatchingModel(model, max_rows=2, release_after=60)
    for rep in range(2):       # a session within the idle time finds the pages in place
        sess = batched.session([1, 2, 3], rows=1, max_new_tokens=2)
        sess.prefill()
        del sess
        gc.collect()
        assert batched._holders == 0 and batched._k[0].any()
        assert batched._timer is not None                        # a check is pending
    batched._idle_at -= 120                                      # the idle time is over
    batched._idle_check()
    assert not any(k.any() for k in batched._k)                  # released
    again = batched.session([1, 2, 3], rows=1, max_new_tokens=2)
    assert np.array_equal(again.prefill(), model.session([1, 2, 3], 1, 2).prefill())


def test_an_idle_pools_timer_releases_its_pages(model):
    batched = BatchingModel(model, max_rows=2, release_after=0.2)
    sess = batched.session([1, 2, 3], rows=1, max_new_tokens=2)
    sess.prefill()
    del sess
    gc.collect()
    deadline = time.monotonic() + 30
    while any(k.any() for k in batched._k) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(k.any() for k in batched._k)                  # released by the timer


def test_prompts_and_steps_of_several_sessions_in_one_forward(model):
    """One forward holding two prompts (one echoing every position) and the steps of two
    other sessions gives each the bits it has alone."""
    from refcomplete.batching import _Job
    batched = BatchingModel(model, max_rows=8)
    a = batched.session([5, 6, 7, 8], rows=2, max_new_tokens=4)
    a.prefill()
    b = batched.session([9], rows=1, max_new_tokens=4)
    b.prefill()
    a.step([0, 1], [1, 2])
    ta, tb = batched._take(2), batched._take(1)
    jobs = [_Job(kind="prefill", prompt=np.array([3, 1, 4, 1, 5]), slots=ta.slots,
                 all_positions=True, ticket=ta),
            _Job(kind="step", slots=a.slots[[1, 0]], tokens=np.array([30, 40])),
            _Job(kind="prefill", prompt=np.array([2, 7]), slots=tb.slots, ticket=tb),
            _Job(kind="step", slots=b.slots, tokens=np.array([50]))]
    za, zs, zb, zt = batched._forward(jobs)
    assert np.array_equal(za, model.session([3, 1, 4, 1, 5], 2, 2).prefill(all_positions=True))
    assert np.array_equal(zb, model.session([2, 7], 1, 2).prefill())
    ref = model.session([5, 6, 7, 8], rows=2, max_new_tokens=4)
    ref.prefill()
    ref.step([0, 1], [1, 2])
    assert np.array_equal(zs, ref.step([1, 0], [30, 40]))
    ref_b = model.session([9], rows=1, max_new_tokens=4)
    ref_b.prefill()
    assert np.array_equal(zt, ref_b.step([0], [50]))
    # the copied prompt serves the second row of the new session like the first
    z0 = batched._forward([_Job(kind="step", slots=ta.slots, tokens=np.array([8, 8]))])[0]
    assert np.array_equal(z0[0], z0[1])
    batched._give(ta)
    batched._give(tb)


def test_a_session_waits_for_slots_that_another_frees(model):
    batched = BatchingModel(model, max_rows=1, slot_wait=30)
    a = batched.session([1, 2], rows=1, max_new_tokens=3)
    a.prefill()
    got = {}

    def other():
        b = batched.session([5, 6], rows=1, max_new_tokens=3)
        got["head"] = b.prefill()
        got["solo"] = b._solo is not None

    t = threading.Thread(target=other)
    t.start()
    t.join(0.3)
    assert t.is_alive()                      # waiting: the only slot is a's
    a.step([0], [4])
    del a
    gc.collect()
    t.join(30)
    assert got["solo"] is False and batched.stats["solo"] == 0
    assert np.array_equal(got["head"], model.session([5, 6], 1, 3).prefill())
