"""Cross-request batching: the prefills and decode steps of every open session, in one
forward per round.

Knows: GPT2Model's forward pieces (_embed, _layers, _head), a pool of KV-cache row slots,
rounds of one forward run by the request threads themselves. Does not know: requests, sampling, HTTP
(server.py runs concurrent requests through it; decode.py is unchanged).

    batched = BatchingModel(load_model("gpt2-tiny-shakespeare"), max_rows=64)
    sess = batched.session(prompt_ids, rows=2, max_new_tokens=8)   # lm.LanguageModel
    sess.prefill()                     # queued: the prompt, into two pool slots
    sess.step([0, 1], [11, 42])        # queued: joins the next batched forward

Dimensions: R = pool slots, L = layers, H = heads, D = head size, S = n_ctx, N = rows of
one batched forward, T = prompt length.

Why no bit changes (SEMANTICS 4). Every kernel computes each row with a reduction order
that depends only on that row, and attention runs over positions strictly in order: the
shared prefix first, then the row's own entries. A pool slot holds its row's prompt keys
and values at entries 0..T-1 and its generated ones after them, and is attended with no
shared prefix (n_pre = 0): the same positions in the same order as runtime.Session's
prompt prefix + row cache, so each row's logits are those of a session stepped alone,
whichever rows share the forward. A prompt goes in as runtime.Session.prefill sends it:
T rows of one sequence (here: of its first slot) at positions 0..T-1, with no prefix; in a
batched forward these rows sit beside other sessions' rows, which changes none of their
bits either; its keys and values are then copied to the session's other slots.
tests/test_batching.py pins all of this bit for bit.

Threads (flat combining). A request thread queues its job; if no thread is running a
round, it runs rounds itself, for everyone, until its job is done, else it waits on its own
job. So one client's forward runs in its own thread (no hand-off), and with many clients
one of them runs the batch; a leader whose job is done hands the lead to the thread of a
job still queued, waking that thread alone. (When every waiter slept on one condition,
each queued job woke all 32 of them: 867 -> 1,044 tok/s for 32 in-process clients.)
Before a batched forward the round waits until every session that may still step has
queued its prefill or step, or no job has been queued for `gap` seconds, or `window`
seconds have passed. A session may still step until its rows have had capacity - 1 steps
(decode.py never feeds back a row's last token) or it is collected; a stream whose reader
stalls, or a row that ended on a stop, delays the others by at most `gap` (sessions' jobs
arrive one after another while they sample, well within it). One forward takes
every queued step and prompts up to `prefill_tokens`. Forwards run under one process-wide
lock (runtime.FORWARD_LOCK), so that Numba's parallel regions never run from two threads at
once; the kernels release the GIL, so request threads sample and stream meanwhile.

Memory. The pool is allocated once, in anonymous mappings: pages are resident only once
written, the lowest free slots are used first (so the resident part follows the peak
number of rows, at most max_rows), and once no session has held a slot for `release_after`
seconds the pages go back to the system (madvise DONTNEED). Not at once: a client's next
request would fault its rows' pages in afresh (about 15% of a one-client server's
throughput on the bundled model).
A session that finds too few free slots waits up to `slot_wait` seconds for others to end
(not longer: its request thread may be a worker that the streams holding slots need),
then runs "solo", on its own runtime.Session, its forwards in rounds of their own, never
batched (the same bits). Slots return
to the pool when the session is collected (weakref.finalize: a finished generator, a
closed stream, a ClientGone raised in a Watched session).
"""

from __future__ import annotations

import heapq
import mmap
import threading
import time
import weakref
from collections import deque

import numpy as np

from refcomplete.runtime import FORWARD_LOCK   # one forward at a time in this process

DEFAULT_MAX_ROWS = 64
POOL_BYTES = 1 << 30              # the default max_rows keeps the pool under this
WINDOW = 0.05                     # seconds a batched forward waits at most for the sessions
GAP = 0.004                       # ... and at most this long after the last job queued
SLOT_WAIT = 1.0                   # seconds a new session waits for free slots, then runs solo
RELEASE_AFTER = 1.0               # seconds a pool with no session keeps its pages
PREFILL_TOKENS = 512              # prompt tokens one batched forward takes (at least 1 prompt)


def default_max_rows(model, budget: int = POOL_BYTES) -> int:
    """DEFAULT_MAX_ROWS, or fewer so that the pool's caches fit in `budget` bytes."""
    cfg = model.config
    per_row = 2 * cfg.n_layer * cfg.n_embd * model.n_ctx * 4     # keys + values, float32
    return max(1, min(DEFAULT_MAX_ROWS, budget // per_row))


class _Job:
    """One piece of work a request thread waits for: its result or its exception. A job
    with `fn` runs alone; a "prefill" or "step" job joins the next batched forward."""

    __slots__ = ("fn", "args", "kind", "prompt", "slots", "tokens", "all_positions",
                 "ticket", "last", "done", "wake", "lead", "value", "error")

    def __init__(self, fn=None, args=(), kind=None, prompt=None, slots=None, tokens=None,
                 all_positions=False, ticket=None, last=False):
        self.fn, self.args, self.kind = fn, args, kind
        self.prompt, self.slots, self.tokens, self.all_positions = prompt, slots, tokens, all_positions
        self.ticket, self.last = ticket, last     # the session's _Ticket; no step after this
        self.done = False                        # set before wake, by the round's thread
        self.wake = threading.Event()            # set when done, or when handed the lead
        self.lead = False                        # its thread runs the rounds
        self.value = self.error = None

    def result(self):
        """Once done (its thread was woken and, if handed the lead, ran rounds until done)."""
        if self.error is not None:
            raise self.error
        return self.value

    def finish(self, value=None, error=None) -> None:
        self.value, self.error, self.done = value, error, True
        self.wake.set()


class _Ticket:
    """A pool session's standing: its slots, and whether a round should wait for its next
    job (until its last possible step has been taken, or it is collected)."""

    __slots__ = ("slots", "expected")

    def __init__(self, slots):
        self.slots, self.expected = slots, True


class BatchingModel:
    """A GPT2Model (refcomplete.runtime) whose sessions' prefills and steps are batched
    across sessions and threads; the same lm.LanguageModel interface and the same bits."""

    def __init__(self, model, max_rows: int | None = None, window: float = WINDOW,
                 gap: float = GAP, prefill_tokens: int = PREFILL_TOKENS,
                 slot_wait: float = SLOT_WAIT, release_after: float = RELEASE_AFTER):
        self._model = model
        cfg = model.config
        R = max_rows or default_max_rows(model)
        L, H, D, S = cfg.n_layer, cfg.n_head, cfg.n_embd // cfg.n_head, model.n_ctx
        self.max_rows, self.window, self.gap, self.prefill_tokens = R, window, gap, prefill_tokens
        self.slot_wait, self.release_after = slot_wait, release_after
        self._maps: list[mmap.mmap] = []                 # the pool's pages (see _release)
        self._k = [self._mapped((R, H, D, S)) for _ in range(L)]          # L x [R, H, D, S]
        self._v = [self._mapped((R, H, S, D)) for _ in range(L)]          # L x [R, H, S, D]
        self._k_none = [np.zeros((H, D, 0), np.float32)] * L               # no shared prefix
        self._v_none = [np.zeros((H, 0, D), np.float32)] * L
        self._n = np.zeros(R, np.int64)                  # [R] filled entries of each slot
        self._free = list(range(R))                      # a heap: lowest slots first
        self._holders = 0                                # sessions holding slots
        self._idle_at = 0.0                              # when the last of them ended
        self._timer: threading.Timer | None = None       # the pending _idle_check
        self._expected = 0                               # ... that may still queue a job
        self._cond = threading.Condition()
        self._calls: deque[_Job] = deque()               # forwards run alone, in order
        self._work: list[_Job] = []                      # prefills and steps of pool sessions
        self._leader = False                             # a thread is running a round
        self.stats = {"forwards": 0, "rows": 0, "prefills": 0, "solo": 0, "forward_s": 0.0}

    def __getattr__(self, name):        # name, n_vocab, n_ctx, eot_id, tokenizer, ops, ...
        return getattr(self._model, name)

    # -- the LanguageModel interface --------------------------------------------------------

    def session(self, prompt, rows: int, max_new_tokens: int) -> "BatchedSession":
        if len(prompt) == 0 or len(prompt) + max_new_tokens > self.n_ctx:
            raise ValueError(f"prompt of {len(prompt)} tokens + {max_new_tokens} new exceeds "
                             f"n_ctx {self.n_ctx}")
        return BatchedSession(self, np.asarray(prompt, dtype=np.int64), rows, max_new_tokens)

    def logits(self, ids) -> np.ndarray:
        return self._call(self._model.logits, ids)

    # -- slots ------------------------------------------------------------------------------

    def _take(self, rows: int) -> _Ticket | None:
        """A ticket for `rows` free slots (lowest first), waiting up to slot_wait seconds
        for sessions to end; None when there are still too few."""
        with self._cond:
            deadline = time.monotonic() + self.slot_wait
            while rows > len(self._free) and rows <= self.max_rows:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            if rows > len(self._free):
                self.stats["solo"] += 1
                return None
            self._holders += 1
            self._expected += 1
            return _Ticket(np.array([heapq.heappop(self._free) for _ in range(rows)], np.int64))

    def _unexpect(self, ticket: _Ticket) -> None:
        """Under the lock: rounds no longer wait for this session."""
        if ticket.expected:
            ticket.expected = False
            self._expected -= 1

    def _give(self, ticket: _Ticket) -> None:
        with self._cond:
            self._unexpect(ticket)
            for s in ticket.slots:
                heapq.heappush(self._free, int(s))
            self._holders -= 1
            if self._holders == 0:
                self._idle_at = time.monotonic()
                self._release() if self.release_after <= 0 else self._check_idle_in(self.release_after)
            self._cond.notify_all()       # a forward may be waiting for this session

    def _mapped(self, shape) -> np.ndarray:
        """A float32 array in its own anonymous mapping (np.empty's pages, releasable)."""
        size = int(np.prod(shape))
        try:       # private: DONTNEED frees the pages (a shared mapping only unmaps them)
            pages = mmap.mmap(-1, max(4 * size, 1), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        except (AttributeError, OSError):                # not POSIX: plain memory, kept
            return np.empty(shape, np.float32)
        self._maps.append(pages)
        return np.frombuffer(pages, np.float32, size).reshape(shape)

    def _check_idle_in(self, seconds: float) -> None:
        """Under the lock: _idle_check in `seconds`, unless one is pending already."""
        if self._timer is None:
            self._timer = threading.Timer(seconds, self._idle_check)
            self._timer.daemon = True
            self._timer.start()

    def _idle_check(self) -> None:
        """Release the pool's pages if no session has held a slot for release_after seconds;
        if the pool went idle again since, check again when that idle time is over."""
        with self._cond:
            self._timer = None
            if self._holders == 0:
                left = self._idle_at + self.release_after - time.monotonic()
                self._release() if left <= 0 else self._check_idle_in(left)

    def _release(self) -> None:
        """No session holds a slot: hand the pool's pages back to the system (they read
        as zeros, and no entry is read before it is written again)."""
        for pages in self._maps:
            try:
                pages.madvise(mmap.MADV_DONTNEED)
            except (AttributeError, OSError, ValueError):   # no madvise here: keep them
                return

    # -- request threads --------------------------------------------------------------------

    def _submit(self, job: _Job, alone: bool):
        """Queue the job; wait on it, or, when no thread is running rounds (or this one is
        handed the lead), run them until it is done (the module docstring's Threads)."""
        with self._cond:
            (self._calls if alone else self._work).append(job)
            self._cond.notify_all()              # a round waiting for this session's job
            job.lead = not self._leader
            self._leader = True
        if not job.lead:
            job.wake.wait()                      # done, or handed the lead
        if job.lead:
            self._lead(job)
        return job.result()

    def _lead(self, job: _Job) -> None:
        """Run rounds until `job` is done; then pass the lead to a queued job's thread, or
        leave it free."""
        try:
            while not job.done:
                with self._cond:
                    call, batch = self._next_round()
                self._run_call(call) if call is not None else self._batched(batch)
        finally:
            with self._cond:
                heir = self._calls[0] if self._calls else self._work[0] if self._work else None
                self._leader = heir is not None
                if heir is not None:
                    heir.lead = True
                    heir.wake.set()

    def _call(self, fn, *args):
        """Run fn(*args) in a round of its own (not batched); return its result."""
        return self._submit(_Job(fn, args), alone=True)

    def _prefill(self, prompt: np.ndarray, ticket: _Ticket, all_positions: bool,
                 last: bool = False) -> np.ndarray:
        """Prefill `prompt` into the ticket's slots (in the next batched forward); [T or 1,
        V] logits. last: the session will step no more."""
        return self._submit(_Job(kind="prefill", prompt=prompt, slots=ticket.slots,
                                 all_positions=all_positions, ticket=ticket, last=last),
                            alone=False)

    def _step(self, slots: np.ndarray, tokens: np.ndarray, ticket: _Ticket | None = None,
              last: bool = False) -> np.ndarray:
        """Append tokens[i] to slot slots[i] in the next batched forward; [B, V] logits."""
        return self._submit(_Job(kind="step", slots=slots, tokens=tokens, ticket=ticket,
                                 last=last), alone=False)

    # -- a round: run by one of the waiting threads ----------------------------------------

    def _next_round(self) -> tuple[_Job | None, list[_Job] | None]:
        """Under the lock: the next job that runs alone, or else the next batch, once every
        session holding slots has queued its work or the window has passed."""
        if self._calls:
            return self._calls.popleft(), None
        start = last = time.monotonic()
        seen = len(self._work)
        while (sum(j.ticket is not None and j.ticket.expected for j in self._work) < self._expected
               and not self._calls):
            now = time.monotonic()
            if len(self._work) != seen:
                seen, last = len(self._work), now
            left = min(start + self.window, last + self.gap) - now
            if left <= 0:
                break
            self._cond.wait(left)
        batch, self._work = self._take_batch(self._work)
        for job in batch:
            if job.last:
                self._unexpect(job.ticket)
        return None, batch

    @staticmethod
    def _run_call(job: _Job) -> None:
        try:
            with FORWARD_LOCK:
                value = job.fn(*job.args)
        except BaseException as exc:      # handed to the waiting thread
            job.finish(error=exc)
        else:
            job.finish(value)

    def _take_batch(self, work: list[_Job]) -> tuple[list[_Job], list[_Job]]:
        """(this forward's jobs, the rest): every step, and prefills in order while their
        prompts total at most prefill_tokens (at least one)."""
        batch, rest, budget = [], [], self.prefill_tokens
        for job in work:
            if job.kind == "prefill":
                if budget < len(job.prompt) and budget < self.prefill_tokens:
                    rest.append(job)
                    continue
                budget -= len(job.prompt)
            batch.append(job)
        return batch, rest

    def _batched(self, batch: list[_Job]) -> None:
        """One forward over the batch; if it fails, each job alone, so that the error
        reaches only the job it belongs to (a re-run writes the same cache entries)."""
        try:
            with FORWARD_LOCK:
                start = time.perf_counter()
                values = self._forward(batch)
                self.stats["forward_s"] += time.perf_counter() - start
        except BaseException as exc:
            if len(batch) == 1:
                batch[0].finish(error=exc)
                return
            for job in batch:
                self._batched([job])
            return
        for job, value in zip(batch, values):
            job.finish(value)

    def _forward(self, batch: list[_Job]) -> list[np.ndarray]:
        """Prompts (T rows of one slot each: runtime.Session.prefill's rows) and steps (one
        row per slot) through the layers as one batch, each row attending over its own slot
        only (n_pre = 0); the LM head over the rows whose logits are asked for."""
        m = self._model
        rows, pos, tokens, head = [], [], [], []
        i = 0
        for job in batch:
            if job.kind == "prefill":
                T = len(job.prompt)
                rows.append(np.full(T, job.slots[0], np.int64))
                pos.append(np.arange(T))
                tokens.append(job.prompt)
                head.append(np.arange(i if job.all_positions else i + T - 1, i + T))
                i += T
            else:
                B = len(job.slots)
                rows.append(job.slots)
                pos.append(self._n[job.slots])
                tokens.append(job.tokens)
                head.append(np.arange(i, i + B))
                i += B
        rows, pos, tokens = np.concatenate(rows), np.concatenate(pos), np.concatenate(tokens)
        x = m._embed(tokens, pos)                                       # [N, C]
        x = m._layers(x, self._k_none, self._v_none, 0, self._k, self._v, rows, pos)
        z = m._head(np.ascontiguousarray(x[np.concatenate(head)]))     # [sum of heads, V]
        out, j = [], 0
        for job, h in zip(batch, head):
            out.append(z[j:j + len(h)])
            j += len(h)
            if job.kind == "prefill":                                   # copy to the other rows
                T, first = len(job.prompt), job.slots[0]
                for k, v in zip(self._k, self._v):
                    k[job.slots[1:], :, :, :T] = k[first, :, :, :T]
                    v[job.slots[1:], :, :T] = v[first, :, :T]
                self._n[job.slots] = T
            else:
                self._n[job.slots] += 1
        self.stats["forwards"] += 1
        self.stats["rows"] += i
        self.stats["prefills"] += sum(job.kind == "prefill" for job in batch)
        return out


class BatchedSession:
    """A session of a BatchingModel: rows in pool slots, or solo when the pool was full."""

    def __init__(self, owner: BatchingModel, prompt: np.ndarray, rows: int, capacity: int):
        self._owner, self.prompt, self.rows, self.capacity = owner, prompt, rows, capacity
        self.n_row = np.zeros(rows, np.int64)
        self.slots = None              # [rows] pool slots, once prefilled
        self._ticket = None
        self._solo = None              # a runtime.Session when the pool had no room
        self._prefilled = False

    def prefill(self, all_positions: bool = False) -> np.ndarray:
        if self._prefilled:
            raise RuntimeError("prefill() was already called on this session")
        self._prefilled = True
        owner = self._owner
        ticket = owner._take(self.rows) if self.capacity > 0 else None
        if ticket is None:
            self._solo = owner._model.session(self.prompt, self.rows, self.capacity)
            return owner._call(self._solo.prefill, all_positions)
        self._ticket, self.slots = ticket, ticket.slots
        weakref.finalize(self, owner._give, ticket)
        # decode.py steps a row at most capacity - 1 times (its last token is not fed back)
        return owner._prefill(self.prompt, ticket, all_positions, last=self.capacity <= 1)

    def step(self, rows, tokens) -> np.ndarray:
        if not self._prefilled:
            raise RuntimeError("call prefill() before step()")
        rows = np.asarray(rows, dtype=np.int64)
        tokens = np.asarray(tokens, dtype=np.int64)
        n = self.n_row[rows] + 1                         # each row's steps with this one
        if len(rows) and (n.max() > self.capacity or len(set(rows.tolist())) != len(rows)):
            raise ValueError("row capacity exceeded or a row given twice")
        self.n_row[rows] = n
        if self._solo is not None:
            return self._owner._call(self._solo.step, rows, tokens)
        # Rows left out of a step have finished (decode.py never steps them again): when
        # these rows have had capacity - 1 steps, rounds need not wait for this session.
        last = bool(not len(rows) or n.min() >= self.capacity - 1)
        return self._owner._step(self.slots[rows], tokens, self._ticket, last)
