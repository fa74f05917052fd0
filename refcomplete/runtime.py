"""The fast GPT-2 runtime: a prompt prefill, then batched KV-cache decode steps, all with
the Numba kernels (refcomplete.kernels). Implements refcomplete.lm.LanguageModel.

Knows: how to run a checkpoint quickly and batch-invariantly. Does not know: sampling,
requests, where checkpoints live (registry.py).

Dimensions: T = prompt length, R = rows of a session, B = rows in one step,
L = layers, H = heads, D = head size, C = n_embd, S = per-row capacity, V = vocabulary.

Backends (SEMANTICS 11): "numba" runs kernels/gpt2.py, "numpy" its strict twins in
kernels/gpt2_numpy.py; the same operations in the same order, so the same bits.

Invariance (SEMANTICS 4): the prompt is prefilled once per session, alone, so its cache
does not depend on the rows; every token, prompt or generated, goes through kernels
whose per-row results depend neither on the batch nor on the thread count. No BLAS call
is made, so OpenBLAS's thread count cannot change a bit either (it did when the prefill
used the NumPy reference's matmuls). The reference (reference.py) is the spec the tests
pin this runtime to.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from pathlib import Path

import numpy as np

from refcomplete.checkpoint import Checkpoint, release_pages
from refcomplete.tokenizer import EOT_ID, get_tokenizer


BACKENDS = ("numba", "numpy")
# The kernels release the GIL (nogil: other threads sample and stream meanwhile), so two
# threads could enter parallel regions at once, which Numba's workqueue threading layer
# aborts on. Every forward piece (_layers, _head) holds this process-wide lock.
FORWARD_LOCK = threading.RLock()
# The per-layer weights the kernels' `blocks` takes, in its order (a tuple of L arrays each).
BLOCK_WEIGHTS = ("ln_1.weight", "ln_1.bias", "attn.c_attn.weight", "attn.c_attn.bias",
                 "attn.c_proj.weight", "attn.c_proj.bias", "ln_2.weight", "ln_2.bias",
                 "mlp.c_fc.weight", "mlp.c_fc.bias", "mlp.c_proj.weight", "mlp.c_proj.bias")
# Those of them that are linear layers' weights, which go in the backend's packed layout.
PACKED = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
# Where packed weights go to be shared between processes (serve --workers N sets it in each
# worker: one copy of them in memory, not N); None: each model packs its own, in memory.
PACK_DIR: Path | None = None


PACKS_PREFIX = "refcomplete-packed-"


@contextlib.contextmanager
def shared_packs():
    """A fresh temporary directory to be the PACK_DIR of processes started inside the
    block (server.serve's workers, batch.run_pool's); removed, with its packs, on exit.

    A process killed inside the block (SIGKILL, a crash) cannot remove its directory, a
    copy of the packed weights (about 500 MB for GPT-2 124M). So the directory holds an
    `owner` file, locked (flock) while the block runs: the lock lives as long as the
    owner and the processes it started, whatever their pid namespace. Each new block first
    removes the directories whose owner lock it can take (sweep_stale_packs). The
    directory is made under another name and renamed once locked, so a sweep never
    meets one that is not locked yet."""
    import fcntl
    import os
    import shutil
    import tempfile

    root = Path(tempfile.gettempdir())
    sweep_stale_packs(root)
    making = Path(tempfile.mkdtemp(prefix="." + PACKS_PREFIX, dir=root))
    with open(making / "owner", "w") as owner:
        fcntl.flock(owner, fcntl.LOCK_EX)                 # released when every holder exits
        packs = root / making.name[1:]
        os.rename(making, packs)
        try:
            yield packs
        finally:
            shutil.rmtree(packs, ignore_errors=True)


def sweep_stale_packs(root: Path) -> list[Path]:
    """Remove the shared_packs directories under `root` that no live process holds (their
    `owner` lock can be taken); return them. Others' directories that this user may not
    open or remove are left alone."""
    import fcntl
    import shutil

    gone = []
    for packs in root.glob(PACKS_PREFIX + "*"):
        try:
            with open(packs / "owner", "r") as owner:
                fcntl.flock(owner, fcntl.LOCK_EX | fcntl.LOCK_NB)
                shutil.rmtree(packs, ignore_errors=True)   # still locked: no block starts here
        except OSError:                                   # held (alive), not ours, no owner file
            continue
        gone.append(packs)
    return gone


def shared_array(path: Path, shape, fill) -> np.ndarray:
    """The float32 array of `shape` in the file at `path`, mapped shared (MAP_SHARED): the
    page cache holds one copy for every process that maps it. The first caller creates it
    (zeros, which fill(out) writes into) under an exclusive lock on the directory's `lock`
    file, and renames it into place once complete; later callers find it and only map it."""
    import fcntl
    import mmap
    import os

    size = 4 * int(np.prod(shape))
    if size == 0:
        return np.zeros(shape, np.float32)
    with open(path.parent / "lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)                  # released when the file closes
        if not path.exists():
            part = path.with_name(path.name + ".part")
            try:
                with open(part, "w+b") as f:
                    if hasattr(os, "posix_fallocate"):    # a full disk is an OSError here,
                        os.posix_fallocate(f.fileno(), 0, size)   # not a SIGBUS in fill()
                    else:
                        f.truncate(size)                  # zeros, written only where filled
                    pages = mmap.mmap(f.fileno(), size)
                    out = np.frombuffer(pages, np.float32).reshape(shape)
                    fill(out)
                    del out
                    pages.close()
                os.replace(part, path)
            except BaseException:
                part.unlink(missing_ok=True)
                raise
    with open(path, "r+b") as f:
        if os.fstat(f.fileno()).st_size != size:
            raise ValueError(f"{path}: {os.fstat(f.fileno()).st_size} bytes, not the {size} "
                             f"of a {shape} float32 array")
        pages = mmap.mmap(f.fileno(), size)
    return np.frombuffer(pages, np.float32).reshape(shape)


def resolve_backend(backend: str | None) -> str:
    """"numba" (the default, compiled) or "numpy" (pure NumPy: no Numba import). Both give
    the same bits (SEMANTICS 11). None means numba where it imports, else numpy."""
    if backend is None:
        return "numba" if _numba_imports() else "numpy"
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}: choose one of {', '.join(BACKENDS)}")
    if backend == "numba" and not _numba_imports():
        raise ImportError("backend 'numba' needs numba, which does not import here "
                          "(pip install numba); backend 'numpy' gives the same bits without it")
    return backend


def _numba_imports() -> bool:
    try:
        import numba  # noqa: F401
    except ImportError:
        return False
    return True


class GPT2Model:
    """A loaded GPT-2 checkpoint, ready to open decode sessions."""

    def __init__(self, checkpoint: Checkpoint, name: str | None = None, backend: str | None = None):
        self.backend = resolve_backend(backend)
        if self.backend == "numba":
            import numba

            from refcomplete.kernels import fmath_numba as ops
            from refcomplete.kernels import gpt2 as kernels  # imports numba: only here
            self._set_threads = numba.set_num_threads
            self._threads = numba.config.NUMBA_NUM_THREADS
        else:
            from refcomplete.kernels import fmath as ops
            from refcomplete.kernels import gpt2_numpy as kernels
            self._set_threads = lambda n: None
            self._threads = 1
        self.thread_share = None            # f(threads) -> threads a forward may use now
        self._k = kernels
        self.ops = ops                      # exp, log, sum for sampling: the same bits either way
        # Threads: a narrow model's layers run on one for a few rows, their kernels being
        # too small to pay for a parallel region (which stalls for milliseconds when
        # another process holds a core); wide models' layers, batches of >= 1024 row
        # values (the bundled model's 32 rows: 3.3 ms against 5.2 on one thread, 2-core
        # Xeon) and every LM head (>= 6M multiply-adds) use all of them. Set per call
        # (numba's setting is per thread). Never changes a value.
        self._wide = checkpoint.config.n_embd >= 512
        # The LM head is a linear layer over the embedding matrix transposed, [C, V], so
        # that it sums over C strictly in order while vectorising across the vocabulary;
        # with the numba backend every linear's weights are packed into column panels
        # (kernels.gpt2.pack). Each packed matrix is a copy, and the mapped file pages
        # behind it are released once it is made: the two are never both resident (the
        # head goes 4096 entries at a time, since huge pages would make the whole copy
        # resident at once, so the file is paged in block by block).
        p, k = checkpoint.params, kernels
        C, V = p.lm_head.shape[::-1]
        release_pages(p.lm_head)
        self.weights_sha256 = checkpoint.weights_sha256                  # names shared packs
        self._pack_dir = PACK_DIR

        def pack_head(out):
            for v0 in range(0, V, 4096):
                block = p.lm_head[v0:v0 + 4096]
                k.pack(block.T, out, v0)
                release_pages(block)
        self._head_w = self._packed("lm_head", k.packed_shape(C, V), pack_head)
        self._head_b = np.zeros(V, np.float32)                           # [V]
        self._block_w = tuple(tuple(self._pack(blk[name], f"h{i}.{name}") if name in PACKED
                                    else self._copy(blk[name]) for i, blk in enumerate(p.blocks))
                              for name in BLOCK_WEIGHTS)
        # The small tensors are copied too (0.5 MB): read in place, each read maps a window
        # of the file around it (fault-around), 10 MB of released weight pages in all.
        self._wpe, self._ln_f = self._copy(p.wpe), (self._copy(p.ln_f_weight), self._copy(p.ln_f_bias))
        if self.backend != "numpy":        # what fault-around mapped back in meanwhile
            release_pages(p.wpe, whole_file=True)
        self.checkpoint = checkpoint
        self.config = checkpoint.config
        self.params = checkpoint.params
        self.name = name or checkpoint.path.name
        self.n_vocab = self.config.n_vocab
        self.n_ctx = self.config.n_ctx
        self.eot_id = EOT_ID

    def _copy(self, w: np.ndarray) -> np.ndarray:
        """w in memory of its own, its file pages released (the numpy backend: w itself)."""
        if self.backend == "numpy":
            return w
        copy = np.array(w)
        release_pages(w)
        return copy

    def _pack(self, w: np.ndarray, key: str) -> np.ndarray:
        """A linear layer's w [K, N] in the backend's layout: the numpy backend takes w as it
        is; numba's is packed (a copy, made 256 rows at a time, each block's file pages
        released once copied, so that at most one block of them is resident beside it)."""
        if self.backend == "numpy":
            return w

        def fill(out):
            for k0 in range(0, w.shape[0], 256):
                self._k.pack(w[k0:k0 + 256], out[:, k0:k0 + 256])
                release_pages(w[k0:k0 + 256])
        return self._packed(key, self._k.packed_shape(*w.shape), fill)

    def _packed(self, key: str, shape, fill) -> np.ndarray:
        """A float32 array of `shape`, zeros that fill(out) writes the packed weights into;
        with a PACK_DIR (serve --workers), the same array in a file there, written by the
        first process that gets to it and mapped by every one (shared_array)."""
        if self._pack_dir is not None:
            name = f"{self.weights_sha256[:16]}.{self.backend}.{'x'.join(map(str, shape))}.{key}"
            try:
                return shared_array(self._pack_dir / name, shape, fill)
            except OSError as exc:            # a full or unwritable disk: copies of our own
                import logging
                logging.getLogger(__name__).warning(
                    "packed weights not shared (%s: %s); this process holds its own copy",
                    self._pack_dir, exc.strerror or exc)
                self._pack_dir = None         # for the rest of this model's weights too
        out = np.zeros(shape, np.float32)
        fill(out)
        return out

    @functools.cached_property
    def tokenizer(self):
        """The bundled r50k tokenizer, loaded on first use: the forward pass works on token
        ids and never needs it, and it holds about 22 MB (P6 measures a model without one).
        A model loaded by name (registry.load_model: create, serve) loads it at once, so
        that a damaged ranks file fails the load, not a request."""
        return get_tokenizer()

    def session(self, prompt, rows: int, max_new_tokens: int) -> "Session":
        if len(prompt) == 0 or len(prompt) + max_new_tokens > self.n_ctx:
            raise ValueError(f"prompt of {len(prompt)} tokens + {max_new_tokens} new exceeds n_ctx {self.n_ctx}")
        return Session(self, np.asarray(prompt, dtype=np.int64), rows, max_new_tokens)

    def logits(self, ids) -> np.ndarray:
        """Logits for every position of ids, float32 [T, V] (a prefill, no generation)."""
        return self.session(ids, rows=1, max_new_tokens=0).prefill(all_positions=True)

    def _embed(self, tokens, positions) -> np.ndarray:                # [B] -> [B, C]
        if self.params.lm_head is self.params.wte:                    # tied: the copy, not the file
            return self._k.unpack_columns(self._head_w, tokens) + self._wpe[positions]
        return self.params.wte[tokens] + self._wpe[positions]

    def _layers(self, x, k_pre, v_pre, n_pre, k_row, v_row, rows, slot) -> np.ndarray:
        """Every block, with the kernels, for B new tokens: x [B, C] (embedded); token i is
        row rows[i]'s entry slot[i], after the n_pre shared prompt entries: keys k_pre
        (L x [H, D, P], transposed), values v_pre (L x [H, P, D]). Writes the new keys and
        values into k_row (L x [R, H, D, S]) and v_row (L x [R, H, S, D]). The layer loop
        is the kernels' `blocks` (one compiled call; gpt2_numpy.blocks reads the same)."""
        B, C = x.shape
        tasks = self._threads_now() if self._wide or B * C >= 1024 else 1
        with FORWARD_LOCK:
            self._set_threads(tasks)
            return self._k.blocks(x, self._block_w, self.config.layer_norm_epsilon,
                                  tuple(k_pre), tuple(v_pre), n_pre, tuple(k_row), tuple(v_row),
                                  np.asarray(rows, np.int64), np.asarray(slot, np.int64), tasks)

    def _head(self, x: np.ndarray) -> np.ndarray:                    # [B, C] -> [B, V]
        k, cfg = self._k, self.config
        h = np.empty_like(x)
        out = np.empty((x.shape[0], self.n_vocab), np.float32)
        with FORWARD_LOCK:
            threads = self._threads_now()
            self._set_threads(threads)
            k.layer_norm(x, *self._ln_f, cfg.layer_norm_epsilon, h)
            k.linear(h, self._head_w, self._head_b, out, threads)
        return out

    def _threads_now(self) -> int:
        """Threads for this forward: all of the backend's, or the share `thread_share`
        grants (serve --workers: the cores split between the workers busy now). Never
        changes a value."""
        if self.thread_share is None:
            return self._threads
        return max(1, min(self._threads, self.thread_share(self._threads)))


class Session:
    """A shared prompt and R rows continuing it, each with its own KV cache."""

    def __init__(self, model: GPT2Model, prompt: np.ndarray, rows: int, capacity: int):
        cfg = model.config
        self.model, self.prompt, self.rows, self.capacity = model, prompt, rows, capacity
        H, D = cfg.n_head, cfg.n_embd // cfg.n_head
        self.k_pre: list[np.ndarray] = []                               # L x [H, D, T]
        self.v_pre: list[np.ndarray] = []                               # L x [H, T, D]
        S = max(capacity, 1)
        self.k_row = [np.empty((rows, H, D, S), np.float32) for _ in range(cfg.n_layer)]
        self.v_row = [np.empty((rows, H, S, D), np.float32) for _ in range(cfg.n_layer)]
        self.n_row = np.zeros(rows, np.int64)                           # filled entries per row

    def prefill(self, all_positions: bool = False) -> np.ndarray:
        """Run the prompt once, for every row; return [T, V] or [1, V] logits.

        The prompt goes through the same kernels as decode steps, as T rows of one
        sequence with no shared prefix: its cache then does not depend on BLAS's thread
        count, and no BLAS thread pool is left spinning against the decode kernels.
        """
        if self.k_pre:
            raise RuntimeError("prefill() was already called on this session")
        m, cfg = self.model, self.model.config
        T, H, D = len(self.prompt), cfg.n_head, cfg.n_embd // cfg.n_head
        k_none = [np.zeros((H, D, 0), np.float32)] * cfg.n_layer         # no shared prefix
        v_none = [np.zeros((H, 0, D), np.float32)] * cfg.n_layer
        k_all = [np.empty((1, H, D, T), np.float32) for _ in range(cfg.n_layer)]
        v_all = [np.empty((1, H, T, D), np.float32) for _ in range(cfg.n_layer)]
        x = m._embed(self.prompt, np.arange(T))                          # [T, C]
        x = m._layers(x, k_none, v_none, 0, k_all, v_all, np.zeros(T, np.int64), np.arange(T))
        self.k_pre = [k[0] for k in k_all]                               # L x [H, D, T]
        self.v_pre = [v[0] for v in v_all]
        x = np.ascontiguousarray(x if all_positions else x[-1:])
        return m._head(x)

    def step(self, rows, tokens) -> np.ndarray:
        """Append tokens[i] to rows[i]; return float32 [B, V] next-token logits."""
        if not self.k_pre:
            raise RuntimeError("call prefill() before step()")
        m = self.model
        rows = np.asarray(rows, dtype=np.int64)
        tokens = np.asarray(tokens, dtype=np.int64)
        if np.any(self.n_row[rows] >= self.capacity) or len(np.unique(rows)) != len(rows):
            raise ValueError("row capacity exceeded or a row given twice")
        T = len(self.prompt)
        slot = self.n_row[rows]                                         # [B] cache slot of the new token
        x = m._embed(tokens, T + slot)                                  # [B, C]
        x = m._layers(x, self.k_pre, self.v_pre, T, self.k_row, self.v_row, rows, slot)
        self.n_row[rows] += 1
        return m._head(x)
