"""refcomplete batch: OpenAI Batch line formats, per-line errors, order, resuming after a
real kill, and the same bytes from one process, local workers and Ray."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from refcomplete import batch
from refcomplete.cli import main
from refcomplete.completions import Completions

MODEL = "gpt2-tiny-shakespeare"
PROMPTS = ["ROMEO:", "JULIET:", "First Citizen:", "To be", "O", "KING HENRY:"]


def line(cid, body, url="/v1/completions", method="POST"):
    return json.dumps({"custom_id": cid, "method": method, "url": url, "body": body})


def reproducible(count, max_tokens=6):
    """Lines whose answers are fixed: each carries a seed or is greedy (create() draws a
    fresh seed otherwise, as OpenAI does)."""
    out = []
    for i in range(count):
        body = {"model": MODEL, "prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": max_tokens}
        kind = i % 4
        if kind == 0:
            body.update(seed=i, temperature=0.9, top_p=0.95)
        elif kind == 1:
            body.update(temperature=0, logprobs=2, echo=True)
        elif kind == 2:
            body.update(seed=1000 + i, n=2, best_of=3, stop=["\n"])
        else:
            body.update(seed=i, presence_penalty=0.5, logit_bias={"198": -100})
        out.append(line(f"req-{i}", body))
    return out


def write(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return path


def same_bytes(data: bytes) -> bytes:
    """The output with what differs between runs (ids, created, request_id) blanked."""
    data = re.sub(rb'"(id|request_id)": "[^"]*"', rb'"\1": "-"', data)
    return re.sub(rb'"created": \d+', rb'"created": 0', data)


@pytest.fixture(scope="module")
def endpoint():
    return Completions()


def test_line_formats_and_per_line_errors(tmp_path, endpoint):
    good = {"model": MODEL, "prompt": "ROMEO:", "max_tokens": 3, "temperature": 0}
    src = write(tmp_path / "in.jsonl", [
        line("ok", good),
        "{not json",
        "[1, 2]",
        json.dumps({"method": "POST", "url": "/v1/completions", "body": good}),
        line("ok", good),                                   # duplicate custom_id
        line("chat", good, url="/v1/chat/completions"),
        line("get", good, method="GET"),
        json.dumps({"custom_id": "nobody", "method": "POST", "url": "/v1/completions"}),
        "",                                                 # blank: no output line
        line("hot", {**good, "temperature": 3}),
        line("stream", {**good, "stream": True}),
        line("nomodel", {**good, "model": "no-such-model"}),
        line("self", {**good, "self": 1}),
        line("last", good),
    ])
    counts = batch.run(str(src), str(tmp_path / "out.jsonl"), progress=False,
                       completions=endpoint)
    out = [json.loads(x) for x in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert counts == {"ok": 2, "failed": 11, "skipped": 0}
    assert [list(o) for o in out] == [["id", "custom_id", "response", "error"]] * 13
    assert all(o["id"].startswith("batch_req_") for o in out)
    ok = out[0]
    assert ok["custom_id"] == "ok" and ok["error"] is None
    assert ok["response"]["status_code"] == 200
    assert ok["response"]["body"]["choices"][0]["text"] == \
        endpoint.create(**good)["choices"][0]["text"]
    assert re.fullmatch(r"[0-9a-f]{32}", ok["response"]["request_id"])
    line_errors = [(o["custom_id"], o["error"]["code"], o["error"]["line"], o["response"])
                   for o in out[1:8]]
    assert line_errors == [(None, "invalid_json_line", 2, None), (None, "invalid_json_line", 3, None),
                           (None, "missing_required_parameter", 4, None),
                           ("ok", "duplicate_custom_id", 5, None),
                           ("chat", "invalid_url", 6, None), ("get", "invalid_method", 7, None),
                           ("nobody", "missing_required_parameter", 8, None)]
    # a body create() refuses: the HTTP status and OpenAI's error body, `error` null
    refused = {o["custom_id"]: o for o in out[8:12]}
    assert all(o["error"] is None for o in refused.values())
    assert refused["hot"]["response"]["status_code"] == 400
    assert refused["hot"]["response"]["body"]["error"]["param"] == "temperature"
    assert refused["stream"]["response"]["status_code"] == 400
    assert refused["stream"]["response"]["body"]["error"]["param"] == "stream"
    assert refused["nomodel"]["response"]["status_code"] == 404
    assert refused["nomodel"]["response"]["body"]["error"]["code"] == "model_not_found"
    assert refused["self"]["response"]["body"]["error"]["type"] == "invalid_request_error"
    assert out[12]["custom_id"] == "last" and out[12]["response"]["status_code"] == 200


def test_resume_skips_what_is_written_and_cuts_a_partial_line(tmp_path, endpoint):
    lines = reproducible(8, max_tokens=4) + ["oops", line("req-1", {})]   # keyless, duplicate
    src = write(tmp_path / "in.jsonl", lines)
    ref = tmp_path / "ref.jsonl"
    batch.run(str(src), str(ref), progress=False, completions=endpoint)
    full = ref.read_bytes().splitlines(keepends=True)
    assert len(full) == 10
    for k in (0, 3, 8, 9, 10):
        out = tmp_path / f"out{k}.jsonl"
        out.write_bytes(b"".join(full[:k]) + (full[k][:17 + 20 * (k % 2)] if k < 10 else b""))
        counts = batch.run(str(src), str(out), progress=False, completions=endpoint)
        assert counts["skipped"] == k
        assert same_bytes(out.read_bytes()) == same_bytes(ref.read_bytes()), k
    # the written lines are kept as they are, ids included
    assert (tmp_path / "out10.jsonl").read_bytes() == ref.read_bytes()


def test_not_an_output_file_is_refused(tmp_path, endpoint):
    src = write(tmp_path / "in.jsonl", reproducible(1))
    out = tmp_path / "out.jsonl"
    out.write_text("hello\n")
    with pytest.raises(batch.BatchFileError, match="not a batch output line"):
        batch.run(str(src), str(out), progress=False, completions=endpoint)
    assert out.read_text() == "hello\n"
    assert main(["batch", str(src), "--out", str(out)]) == 2
    out.write_text("no newline at the end")
    assert main(["batch", str(src), "--out", str(out)]) == 2
    assert out.read_text() == "no newline at the end"
    assert main(["batch", str(src), "--out", str(tmp_path / "no" / "dir.jsonl")]) == 2


def test_workers_write_the_same_bytes_in_input_order(tmp_path, endpoint):
    src = write(tmp_path / "in.jsonl", reproducible(10) + ["junk", line("x", {"prompt": 1})])
    one, two = tmp_path / "one.jsonl", tmp_path / "two.jsonl"
    batch.run(str(src), str(one), progress=False, completions=endpoint)
    batch.run(str(src), str(two), workers=2, progress=False)
    assert [json.loads(x)["custom_id"] for x in two.read_text().splitlines()] == \
        [f"req-{i}" for i in range(10)] + [None, "x"]
    assert same_bytes(one.read_bytes()) == same_bytes(two.read_bytes())


def test_pool_window_keeps_order_with_a_window_of_one():
    items = [batch.parse_line(i + 1, x.encode(), set()) for i, x in enumerate(reproducible(5, 3))]
    got = [item.custom_id for item, _ in batch.run_pool(iter(items), 2, None, window=1)]
    assert got == [f"req-{i}" for i in range(5)]


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="reads the workers' /proc maps")
def test_pool_workers_map_one_copy_of_the_packed_weights(tmp_path, monkeypatch):
    """run_pool's workers share each packed weight array through one file (runtime.PACK_DIR
    in a temporary directory) and the directory goes when the run ends."""
    import tempfile
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    items = [batch.parse_line(i + 1, x.encode(), set()) for i, x in enumerate(reproducible(32, 3))]
    run = batch.run_pool(iter(items), 2, None)    # 8 lines in flight: both workers get some
    next(run)
    folders = list(tmp_path.glob("refcomplete-packed-*"))
    assert len(folders) == 1
    mapped = {}
    while len(mapped) < 2:                        # until both workers have loaded the model
        assert next(run, None) is not None, f"one worker answered every line: {mapped}"
        for pid in _children(os.getpid()):
            with open(f"/proc/{pid}/maps") as f:
                files = {line.split()[5] for line in f if str(folders[0]) in line}
            if files:
                mapped[pid] = files
    a, b = mapped.values()
    assert a == b and len(a) == 1 + 4 * 8          # the LM head + four linears a layer
    list(run)
    assert not folders[0].exists()


def _children(pid):
    kids = []
    for d in os.listdir("/proc"):
        try:
            with open(f"/proc/{d}/stat") as f:
                if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                    kids.append(int(d))
        except (OSError, ValueError, IndexError):
            pass
    return kids


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="needs /proc to find the workers")
@pytest.mark.parametrize("workers", [1, 2])
def test_a_killed_run_resumes_to_the_uninterrupted_output(tmp_path, endpoint, workers):
    """SIGKILL a real `refcomplete batch` mid-run, rerun it: the output equals a run that
    was never interrupted, and a killed run's workers do not outlive it."""
    n = 24
    src = write(tmp_path / "in.jsonl", reproducible(n, max_tokens=12))
    out = tmp_path / "out.jsonl"
    cmd = [sys.executable, "-m", "refcomplete.cli", "batch", str(src), "--out", str(out),
           "--no-progress", "--workers", str(workers)]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not (out.exists() and out.read_bytes().count(b"\n") >= 3):
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.monotonic() < deadline
        time.sleep(0.02)
    kids = _children(proc.pid)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    written = out.read_bytes()
    assert 3 <= written.count(b"\n") < n, "the run ended before it was killed"
    if workers > 1:
        assert len(kids) >= workers      # the pool's processes (and its resource tracker)
    deadline = time.monotonic() + 10
    while any(os.path.exists(f"/proc/{k}") and _state(k) != "Z" for k in kids):
        assert time.monotonic() < deadline, "workers outlived the killed run"
        time.sleep(0.1)
    assert subprocess.run(cmd, capture_output=True).returncode == 0
    ref = tmp_path / "ref.jsonl"
    batch.run(str(src), str(ref), progress=False, completions=endpoint)
    assert out.read_bytes().startswith(written.rsplit(b"\n", 1)[0])
    assert same_bytes(out.read_bytes()) == same_bytes(ref.read_bytes())


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="needs /proc to find the workers")
def test_a_dead_worker_stops_the_run_and_it_resumes(tmp_path, endpoint):
    """A worker killed mid-run is an error that ends the run (not a hang); a rerun finishes."""
    n = 24
    src = write(tmp_path / "in.jsonl", reproducible(n, max_tokens=12))
    out = tmp_path / "out.jsonl"
    cmd = [sys.executable, "-m", "refcomplete.cli", "batch", str(src), "--out", str(out),
           "--no-progress", "--workers", "2"]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE)
    while not (out.exists() and out.read_bytes().count(b"\n") >= 2):
        assert proc.poll() is None, proc.stderr.read().decode()
        time.sleep(0.02)
    workers = [k for k in _children(proc.pid) if b"resource_tracker" not in
               open(f"/proc/{k}/cmdline", "rb").read()]
    os.kill(workers[0], signal.SIGKILL)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode != 0 and b"BrokenProcessPool" in err
    assert out.read_bytes().count(b"\n") < n
    assert subprocess.run(cmd, capture_output=True).returncode == 0
    ref = tmp_path / "ref.jsonl"
    batch.run(str(src), str(ref), progress=False, completions=endpoint)
    assert same_bytes(out.read_bytes()) == same_bytes(ref.read_bytes())


def _state(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "Z"


def test_cli_batch(tmp_path, capsys, monkeypatch):
    src = write(tmp_path / "in.jsonl", reproducible(2, 3))
    assert main(["batch", str(src), "--out", str(tmp_path / "o.jsonl"), "--no-progress"]) == 0
    assert "2 answered, 0 errors, 0 already" in capsys.readouterr().err
    assert main(["batch", str(src), "--out", str(tmp_path / "o.jsonl")]) == 0
    err = capsys.readouterr().err
    assert "0 answered, 0 errors, 2 already" in err and "2/2 lines" in err
    # a finished job starts no workers and no Ray
    assert main(["batch", str(src), "--out", str(tmp_path / "o.jsonl"), "--workers", "2",
                 "--ray", "nowhere:1"]) == 0
    assert main(["batch", str(tmp_path / "missing.jsonl"), "--out", "x.jsonl"]) == 2
    assert main(["batch", str(src), "--out", "x.jsonl", "--workers", "0"]) == 2


def test_progress_bar_redraws_in_place_on_a_terminal():
    from refcomplete.progress import Progress

    class Tty(list):
        def isatty(self):
            return True

        def write(self, s):
            self.append(s)

        def flush(self):
            pass

    stream = Tty()
    bar = Progress(4, 1, stream=stream)
    bar.last -= 1
    bar.step()
    bar.close()
    assert stream[0].startswith("\rbatch [############............] 2/4 lines")
    assert stream[-1].endswith("\n") and "2/4" in stream[-1]


def test_ray_writes_the_same_bytes(tmp_path, endpoint):
    ray = pytest.importorskip("ray", reason="ray is not installed: pip install -e '.[test,ray]'")
    src = write(tmp_path / "in.jsonl", reproducible(10) + ["junk", line("x", {"prompt": 1})])
    one, on_ray = tmp_path / "one.jsonl", tmp_path / "ray.jsonl"
    batch.run(str(src), str(one), progress=False, completions=endpoint)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        counts = batch.run(str(src), str(on_ray), workers=2, ray_address="auto",
                           progress=False, chunk_size=3)
    finally:
        ray.shutdown()
    assert counts == {"ok": 10, "failed": 2, "skipped": 0}
    assert same_bytes(one.read_bytes()) == same_bytes(on_ray.read_bytes())


def test_thread_env_divides_the_cores_this_process_may_use(monkeypatch):
    """Workers' thread pools split the CPU affinity (a container's share), not the machine,
    and a size the user set is left alone."""
    for var in batch.THREAD_VARS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    assert batch.usable_cores() == 4
    assert batch.thread_env(2) == {var: "2" for var in batch.THREAD_VARS}
    assert batch.thread_env(8) == {var: "1" for var in batch.THREAD_VARS}
    monkeypatch.setenv("NUMBA_NUM_THREADS", "3")
    assert "NUMBA_NUM_THREADS" not in batch.thread_env(2)
