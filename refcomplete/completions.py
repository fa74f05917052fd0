"""`create(**params)`: OpenAI's `POST /v1/completions`, as a Python call.

Knows: the order of the work (validate, resolve the model, encode prompts, decode each
prompt's candidates, shape the chunks) and the response envelope (id, created,
system_fingerprint). Does not know: any rule of validation, sampling, stopping or
shaping itself; each lives in its own module.

    >>> import refcomplete
    >>> r = refcomplete.create(model="gpt2-tiny-shakespeare", prompt="ROMEO:", max_tokens=5,
    ...                        temperature=0)
    >>> r["choices"][0]["finish_reason"]
    'length'
    >>> for chunk in refcomplete.create(model="gpt2-tiny-shakespeare", prompt="ROMEO:",
    ...                                 stream=True):
    ...     print(chunk["choices"][0]["text"], end="")

Models are found by a loader (name -> LanguageModel). `create` uses the registry's
`load_model`; tests and notebooks build `Completions(models={"fake": model})` to
serve models they made. Prompts of a list are decoded one after another; the
candidates of one prompt are decoded together (SEMANTICS 4).
"""

from __future__ import annotations

import hashlib
import secrets
import time
from typing import Callable, Iterator, Mapping

from refcomplete import params as P
from refcomplete import rng, streaming
from refcomplete._version import CONTRACT_VERSION, __version__
from refcomplete.choices import choice_pieces
from refcomplete.decode import Plan
from refcomplete.errors import CompletionError, ModelLoadError, ModelNotFoundError
from refcomplete.params import DEFAULT_LIMITS, Limits
from refcomplete.sampling import SamplingParams


def registry_loader(name: str, backend: str | None = None):
    """Load a model by name through refcomplete.registry (imported lazily: it pulls numba),
    on `backend` ("numba" or "numpy": the same bits; None: numba where installed)."""
    from refcomplete import registry

    try:
        return registry.load_model(name, backend)
    except registry.ModelNotFound as exc:
        raise ModelNotFoundError(name) from exc


class Completions:
    """The completions endpoint over a set of models.

    models: a mapping name -> model, or a loader function name -> model that raises
    ModelNotFoundError (or KeyError) for unknown names. Loaded models are kept.
    limits: the bounds on a request's size and work (params.Limits; defaults there).
    """

    def __init__(self, models: Mapping | Callable | None = None,
                 limits: Limits = DEFAULT_LIMITS):
        self._loader = registry_loader if models is None else (
            models.__getitem__ if isinstance(models, Mapping) else models)
        self._loaded: dict = {}
        self.limits = limits

    def model(self, name: str):
        """The loaded model `name`: 404 ModelNotFoundError if there is none, 500
        ModelLoadError (the cause keeps the detail) if its files fail to load. Failures are
        not kept: a later request tries again."""
        if name not in self._loaded:
            try:
                self._loaded[name] = self._loader(name)
            except KeyError as exc:
                raise ModelNotFoundError(name) from exc
            except CompletionError:
                raise
            except Exception as exc:   # CheckpointError, TokenizerFileError, OSError, ...
                raise ModelLoadError(name) from exc
        return self._loaded[name]

    def create(self, /, **request) -> dict | Iterator[dict]:
        """A completion dict, or with stream=True an iterator of chunk dicts.

        Raises CompletionError (400/404) for every bad request, before any work. `self` is
        positional-only, so that every keyword, `self` included, is a request key (an
        unknown one is a 400, never a TypeError).
        """
        req = P.parse(request, self.limits)
        model = self.model(req.model)
        prompts = P.encode_prompts(req, model, self.limits)
        chunks = self._chunks(req, model, prompts)
        if req.stream:
            return streaming.client_stream(chunks, req.include_usage)
        return streaming.fold(chunks)

    def _chunks(self, req: P.CompletionRequest, model, prompts) -> Iterator[dict]:
        seed = rng.fresh_seed() if req.seed is None else req.seed
        sampling = SamplingParams(req.temperature, req.top_p, req.presence_penalty,
                                  req.frequency_penalty, req.logit_bias)
        head = {"id": "cmpl-" + secrets.token_urlsafe(18).replace("-", "x").replace("_", "y"),
                "object": "text_completion", "created": int(time.time()),
                "model": req.model, "system_fingerprint": fingerprint(model)}

        def pieces():
            for i, prompt in enumerate(prompts):
                plan = Plan(rows=req.best_of,
                            max_new_tokens=P.max_new_tokens(req, len(prompt.ids), model.n_ctx),
                            sampling=sampling, seed=seed, stops=req.stop,
                            logprobs=req.logprobs, processed=req.logprobs_mode == "processed",
                            echo=req.echo, rank=req.best_of > req.n, trace=req.trace)
                yield from choice_pieces(model, prompt.ids, plan, req.n, i)

        prompt_tokens = sum(len(p.ids) for p in prompts)
        return streaming.completion_chunks(head, model.tokenizer, pieces(), prompt_tokens,
                                           req.logprobs, req.trace)


def fingerprint(model) -> str:
    """"fp_" + a short hash of the weights, the package version and the contract version."""
    key = f"{model.weights_sha256}|{__version__}|{CONTRACT_VERSION}".encode()
    return "fp_" + hashlib.sha256(key).hexdigest()[:10]


_default = Completions()


def create(**request) -> dict | Iterator[dict]:
    """OpenAI's legacy completions endpoint; see Completions.create and docs/semantics.md."""
    return _default.create(**request)
