"""`refcomplete batch --ray [ADDRESS]`: the same batch job on a Ray cluster.

Knows: Ray (actors, an ordered pool of tasks over chunks of lines). Does not know: the
line formats or resuming (batch.py); each actor answers bodies with batch.answer.

Each actor is one process holding one Completions, so a model loads once per actor, on
its first request. Chunks of `chunk_size` lines are tasks; at most two chunks per actor
are in flight or held back waiting for an earlier chunk, so memory stays bounded and a
kill loses at most those lines. Results come back in input order.

    ray start --head                    # or an existing cluster
    refcomplete batch in.jsonl --out out.jsonl --ray auto --workers 4

Needs the `ray` extra: `pip install 'refcomplete[ray]'`.
"""

from __future__ import annotations

import collections
import os
from typing import Iterable, Iterator

from refcomplete.batch import THREAD_VARS, Item, answer


class BatchActor:
    """One Ray actor: a Completions endpoint, models loaded on first use."""

    def __init__(self, backend: str | None, env: dict):
        os.environ.update(env)     # before numba is first imported in this process
        import functools

        from refcomplete.completions import Completions, registry_loader
        self.completions = Completions(functools.partial(registry_loader, backend=backend))

    def run(self, chunk: list) -> list:
        return [item.ready or answer(self.completions, item.body) for item in chunk]


def _chunks(items: Iterable[Item], size: int) -> Iterator[list]:
    chunk: list = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def run_ray(items: Iterable[Item], address: str, actors: int, backend: str | None,
            chunk_size: int = 8) -> Iterator[tuple]:
    """Yield (item, result) in input order, answered by `actors` Ray actors (0: one per CPU
    of the cluster). Uses the Ray session already initialised in this process, if any;
    otherwise connects to `address` ("local" starts a private instance)."""
    try:
        import ray
        from ray.util import ActorPool
    except ImportError as exc:
        raise SystemExit("refcomplete batch --ray needs Ray: pip install 'refcomplete[ray]'") \
            from exc
    if not ray.is_initialized():
        try:
            ray.init(address=None if address == "local" else address, log_to_driver=False)
        except ConnectionError as exc:
            raise SystemExit(f"refcomplete batch: no Ray cluster at {address!r} ({exc}); "
                             "start one (`ray start --head`) or use --ray local") from exc
    actors = actors or max(1, int(ray.cluster_resources().get("CPU", 1)))
    env = {name: "1" for name in THREAD_VARS}   # one core per actor (num_cpus=1)
    cls = ray.remote(num_cpus=1)(BatchActor)
    handles = [cls.remote(backend, env) for _ in range(actors)]
    pool = ActorPool(handles)
    sent: collections.deque = collections.deque()   # chunks in submission order
    try:
        for chunk in _chunks(items, chunk_size):
            pool.submit(lambda actor, c: actor.run.remote(c), chunk)
            sent.append(chunk)
            if len(sent) >= 2 * actors:
                yield from zip(sent.popleft(), pool.get_next())
        while sent:
            yield from zip(sent.popleft(), pool.get_next())
    finally:
        for h in handles:
            ray.kill(h)
