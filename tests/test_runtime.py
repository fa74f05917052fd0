"""The KV-cache runtime against the NumPy reference forward, and its batch invariance."""

import sys
from pathlib import Path

import numpy as np
import pytest

from refcomplete import reference
from refcomplete.checkpoint import load_checkpoint
from refcomplete.runtime import GPT2Model


@pytest.fixture(scope="module")
def model(tiny_dir):
    return GPT2Model(load_checkpoint(tiny_dir))


def test_prefill_and_steps_match_reference(model):
    ids = [464, 3290, 318, 257, 1332, 13, 50256, 11, 0, 50255]
    ref = reference.forward(ids, model.params, model.config)          # [T, V]
    sess = model.session(ids[:4], rows=1, max_new_tokens=6)
    np.testing.assert_allclose(sess.prefill(all_positions=True), ref[:4], atol=1e-4)
    for t in range(4, len(ids)):
        np.testing.assert_allclose(sess.step([0], [ids[t]])[0], ref[t], atol=1e-4)


@pytest.mark.parametrize("T", [1, 5, 33, 50])
def test_prefill_of_any_length_matches_reference(model, T):
    ids = list(np.random.default_rng(T).integers(0, 50257, T + 3))
    ref = reference.forward(ids, model.params, model.config)
    sess = model.session(ids[:T], rows=2, max_new_tokens=3)
    np.testing.assert_allclose(sess.prefill(all_positions=True), ref[:T], atol=1e-4)
    for t in range(T, T + 3):
        np.testing.assert_allclose(sess.step([1], [ids[t]])[0], ref[t], atol=1e-4)


@pytest.mark.parametrize("T", [5, 40])
def test_last_position_same_with_or_without_all_positions(model, T):
    ids = list(range(1, T + 1))
    a = model.session(ids, 1, 1).prefill(all_positions=True)[-1]
    b = model.session(ids, 1, 1).prefill(all_positions=False)[0]
    assert np.array_equal(a, b)


def test_rows_of_different_lengths_batch_invariant(model):
    """Rows stepped together, alone, or in other groupings give bitwise-equal logits."""
    prompt = [10, 20, 30]
    scripts = {0: [5, 6, 7, 8], 1: [9], 2: [11, 12, 13, 14], 3: [15, 16]}
    together = model.session(prompt, rows=4, max_new_tokens=4)
    together.prefill()
    got = {r: [] for r in scripts}
    for t in range(4):
        active = [r for r in scripts if t < len(scripts[r])]
        logits = together.step(active, [scripts[r][t] for r in active])
        for i, r in enumerate(active):
            got[r].append(logits[i])
    for r, toks in scripts.items():
        alone = model.session(prompt, rows=1, max_new_tokens=4)
        alone.prefill()
        for t, tok in enumerate(toks):
            assert np.array_equal(alone.step([0], [tok])[0], got[r][t]), (r, t)


def test_session_guards(model):
    with pytest.raises(ValueError):
        model.session([1] * 60, rows=1, max_new_tokens=5)
    sess = model.session([1, 2], rows=2, max_new_tokens=1)
    with pytest.raises(RuntimeError):
        sess.step([0], [3])
    sess.prefill()
    sess.step([0], [3])
    with pytest.raises(ValueError):
        sess.step([0], [4])


def test_the_compiled_kernels_release_the_gil():
    """Other threads sample and stream while a forward runs (server.py, batching.py)."""
    pytest.importorskip("numba")
    from refcomplete.kernels import fmath_numba
    from refcomplete.kernels import gpt2 as kernels
    compiled = [kernels.layer_norm, kernels.linear, kernels.linear_gelu, kernels.linear_residual,
                kernels.attend, fmath_numba.exp_shifted_into, fmath_numba.exp_into,
                fmath_numba.log_into, fmath_numba.sum8, fmath_numba.softmax_into,
                fmath_numba.sum_exp, fmath_numba.top_k_ids]
    assert [f.__name__ for f in compiled if not f.targetoptions.get("nogil")] == []


def test_forwards_from_many_threads_at_once_give_the_bits_of_one_at_a_time(model):
    """The kernels release the GIL, so concurrent sessions' forwards meet in the runtime's
    lock (runtime.FORWARD_LOCK), never inside Numba's thread pool; values as sequential."""
    import threading

    prompts = [list(range(1 + i, 12 + 3 * i)) for i in range(6)]

    def run(ids, rows):
        sess = model.session(ids, rows=rows, max_new_tokens=4)
        out = [sess.prefill()]
        for t in range(3):
            out.append(sess.step(list(range(rows)), [ids[t]] * rows))
        return out

    alone = [run(ids, 1 + 4 * (i % 3)) for i, ids in enumerate(prompts)]
    together = [None] * len(prompts)
    threads = [threading.Thread(target=lambda i=i, ids=ids: together.__setitem__(
        i, run(ids, 1 + 4 * (i % 3)))) for i, ids in enumerate(prompts)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for a, b in zip(alone, together):
        assert all(np.array_equal(x, y) for x, y in zip(a, b))


def _resident_kib_of_mapping(array: np.ndarray) -> int | None:
    """Rss of the /proc/self/smaps mapping that holds `array`'s memory (Linux only)."""
    addr = array.__array_interface__["data"][0]
    try:
        lines = open("/proc/self/smaps").read().splitlines()
    except OSError:
        return None
    inside = False
    for line in lines:
        head = line.split()[0]
        if "-" in head and ":" not in head:
            lo, hi = (int(x, 16) for x in head.split("-"))
            inside = lo <= addr < hi
        elif inside and head == "Rss:":
            return int(line.split()[1])
    return None


def test_the_numba_backend_leaves_no_checkpoint_page_resident(tiny_dir):
    # every weight is a copy (packed or not): the file's pages, fault-around's included, go
    ckpt = load_checkpoint(tiny_dir)
    m = GPT2Model(ckpt, backend="numba")
    rss = _resident_kib_of_mapping(ckpt.params.wpe)
    if rss is None:
        pytest.skip("no /proc/self/smaps here")
    assert rss == 0, f"{rss} KiB of the checkpoint still mapped"
    assert m.session([1, 2], 1, 1).prefill().shape == (1, m.n_vocab)


def test_packed_weights_in_a_pack_dir_are_shared_and_change_no_bit(tiny_dir, tmp_path, monkeypatch):
    """With runtime.PACK_DIR (serve --workers), the first model writes each packed weight
    array to a file there and every later one maps that file (MAP_SHARED, one copy in the
    page cache); the logits are those of a model that packed its own."""
    import refcomplete.runtime as rt

    ck = load_checkpoint(tiny_dir)
    alone = GPT2Model(ck).session([5, 6, 7], rows=1, max_new_tokens=2)
    want = np.concatenate([alone.prefill(), alone.step([0], [9])])
    monkeypatch.setattr(rt, "PACK_DIR", tmp_path)
    first = GPT2Model(load_checkpoint(tiny_dir))
    files = sorted(p for p in tmp_path.iterdir() if p.name != "lock")
    n_packed = 1 + len(rt.PACKED) * first.config.n_layer if first.backend == "numba" else 1
    assert len(files) == n_packed and not [p for p in files if p.suffix == ".part"]
    stamps = {p: p.stat().st_mtime_ns for p in files}
    second = GPT2Model(load_checkpoint(tiny_dir))
    assert {p: p.stat().st_mtime_ns for p in files} == stamps          # mapped, not rewritten
    for m in (first, second):
        s = m.session([5, 6, 7], rows=1, max_new_tokens=2)
        assert np.array_equal(np.concatenate([s.prefill(), s.step([0], [9])]), want)
    a, b = first._head_w.reshape(-1), second._head_w.reshape(-1)       # views of the mappings
    b[0] += 1.0                                                         # one copy: both see it
    assert a[0] == b[0]


OWNER = """import sys, time
from refcomplete.runtime import shared_packs
with shared_packs() as packs:
    (packs / "w").write_bytes(b"x")
    print(packs, flush=True)
    time.sleep(120)
"""


@pytest.mark.skipif(sys.platform == "win32", reason="shared_packs locks with flock")
def test_the_pack_dir_of_a_killed_owner_is_swept_by_the_next_one(tmp_path, monkeypatch):
    """A process SIGKILLed inside shared_packs leaves its directory behind; the next
    shared_packs removes it, and leaves a live owner's directory (and its files) alone."""
    import os
    import subprocess
    import tempfile

    from refcomplete.runtime import shared_packs, sweep_stale_packs

    env = {**os.environ, "TMPDIR": str(tmp_path)}
    owners = [subprocess.Popen([sys.executable, "-c", OWNER], env=env, stdout=subprocess.PIPE,
                               text=True) for _ in range(2)]
    try:
        live_dir, dead_dir = (Path(p.stdout.readline().strip()) for p in owners)
        owners[1].kill()
        owners[1].wait()
        assert dead_dir.is_dir() and (dead_dir / "w").exists()     # nobody removed it
        monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
        with shared_packs() as mine:
            assert sorted(tmp_path.iterdir()) == sorted([live_dir, mine])
            assert (live_dir / "w").read_bytes() == b"x"
            assert sweep_stale_packs(tmp_path) == []                # both held
    finally:
        for p in owners:
            p.kill()
            p.wait()
    assert sweep_stale_packs(tmp_path) == [live_dir] and list(tmp_path.iterdir()) == []


def test_a_pack_file_of_the_wrong_size_is_refused(tmp_path):
    from refcomplete.runtime import shared_array

    (tmp_path / "w").write_bytes(b"\0" * 12)
    with pytest.raises(ValueError, match="12 bytes, not the 16"):
        shared_array(tmp_path / "w", (2, 2), lambda out: None)
    got = shared_array(tmp_path / "v", (2, 3), lambda out: out.__setitem__((1, 2), 5.0))
    assert got.tolist() == [[0, 0, 0], [0, 0, 5]]


def test_a_pack_dir_that_cannot_hold_the_weights_falls_back_to_a_copy(tiny_dir, tmp_path,
                                                                       monkeypatch, caplog):
    """A full disk under PACK_DIR (posix_fallocate fails) costs the sharing, not the load:
    the model packs its own copy, says so, and computes the same bits."""
    import errno
    import os

    import refcomplete.runtime as rt

    want = GPT2Model(load_checkpoint(tiny_dir)).session([5, 6], rows=1, max_new_tokens=1).prefill()

    def full(fd, offset, size):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(os, "posix_fallocate", full, raising=False)
    monkeypatch.setattr(rt, "PACK_DIR", tmp_path)
    m = GPT2Model(load_checkpoint(tiny_dir))
    assert caplog.text.count("packed weights not shared") == 1 and "No space left" in caplog.text
    assert [p.name for p in tmp_path.iterdir()] == ["lock"]              # nothing half-made
    assert np.array_equal(m.session([5, 6], rows=1, max_new_tokens=1).prefill(), want)


def test_thread_share_sets_each_forwards_threads_and_changes_no_bit(tiny_dir):
    """GPT2Model.thread_share (serve --workers: the cores split between busy workers) is
    asked before each forward piece, clipped to the backend's threads, never below one."""
    m = GPT2Model(load_checkpoint(tiny_dir))
    want = m.session([5, 6, 7], rows=1, max_new_tokens=1).prefill(all_positions=True)
    used, asked, tasks = [], [], []
    m._set_threads = used.append

    class Kernels:                        # the backend's kernels, recording linear's tasks
        def __getattr__(self, name, k=m._k):
            return getattr(k, name)

        def linear(self, *args, k=m._k):
            tasks.append(args[-1])
            return k.linear(*args)
    m._k = Kernels()
    for share, expect in ((1, 1), (0, 1), (99, m._threads)):
        def grant(threads, share=share):
            asked.append(threads)
            return share
        m.thread_share = grant
        used.clear()
        tasks.clear()
        got = m.session([5, 6, 7], rows=1, max_new_tokens=1).prefill(all_positions=True)
        assert np.array_equal(got, want)
        assert used and set(used) <= {1, expect} and expect in used   # narrow layers: 1
        assert set(tasks) == {expect}                                  # the LM head's split
    assert set(asked) == {m._threads}
