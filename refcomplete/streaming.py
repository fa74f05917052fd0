"""Streaming is the primitive; the non-streamed response is `fold(chunks)` (SEMANTICS 10).

Knows: the chunk and response shapes, usage, SSE framing. Does not know: sampling,
stop strings (pieces arrive already decided), validation.

    chunks = completion_chunks(head, pieces, prompt_tokens, k, trace)  # every chunk + usage
    client_stream(chunks, include_usage)      # what stream=True returns
    fold(chunks)                              # what stream=False returns

Each chunk carries one choice's delta: {"text", "index", "logprobs", "finish_reason"}
(null until that choice's last chunk). The last internal chunk always holds the usage
with "choices": []; clients see it only with stream_options.include_usage, and then
every other chunk has "usage": null. Folding concatenates, per index, the texts,
logprobs lists and traces, so the response equals the stream by construction.
"""

from __future__ import annotations

import json
from typing import Iterable, Iterator

from refcomplete import logprobs


def completion_chunks(head: dict, tokenizer, indexed_pieces, prompt_tokens: int,
                      k: int | None, trace: bool) -> Iterator[dict]:
    """Chunks from (choice index, decode.Piece) pairs; head holds id/object/created/model/
    system_fingerprint. Chunks with nothing to show, and pieces of best_of candidates that
    are not returned (index None), are skipped; the latter still count in usage."""
    completion_tokens = 0
    for index, piece in indexed_pieces:
        completion_tokens += piece.generated
        if index is None or not (piece.text or piece.finish or (piece.tokens and (k is not None or trace))):
            continue
        choice = {"text": piece.text, "index": index,
                  "logprobs": logprobs.block(tokenizer, list(piece.tokens), k),
                  "finish_reason": piece.finish}
        if trace:
            choice["trace"] = [t.trace for _, t in piece.tokens if t.trace is not None]
        yield {**head, "choices": [choice]}
    yield {**head, "choices": [], "usage": {"prompt_tokens": prompt_tokens,
                                            "completion_tokens": completion_tokens,
                                            "total_tokens": prompt_tokens + completion_tokens}}


def client_stream(chunks: Iterable[dict], include_usage: bool) -> Iterator[dict]:
    """The chunks a streaming client sees (stream_options.include_usage, SEMANTICS 10)."""
    for chunk in chunks:
        if chunk["choices"]:
            yield {**chunk, "usage": None} if include_usage else chunk
        elif include_usage:
            yield chunk


def fold(chunks: Iterable[dict]) -> dict:
    """The non-streamed response: per index, concatenate text, logprobs and trace."""
    merged: dict[int, dict] = {}
    response: dict = {}
    for chunk in chunks:
        if not response:
            response = {key: value for key, value in chunk.items()
                        if key not in ("choices", "usage")}
        if "usage" in chunk and chunk["usage"] is not None:
            response["usage"] = chunk["usage"]
        for delta in chunk["choices"]:
            i = delta["index"]
            if i not in merged:
                merged[i] = dict(delta)
                continue
            c = merged[i]
            c["text"] += delta["text"]
            c["logprobs"] = logprobs.concat(c["logprobs"], delta["logprobs"])
            c["finish_reason"] = delta["finish_reason"] or c["finish_reason"]
            if "trace" in delta:
                c["trace"] = c["trace"] + delta["trace"]
    usage = response.pop("usage", None)
    response["choices"] = [merged[i] for i in sorted(merged)]
    if usage is not None:
        response["usage"] = usage
    return response


def sse(chunks: Iterable[dict]) -> Iterator[bytes]:
    """HTTP framing: `data: {json}\\n\\n` per chunk, then `data: [DONE]\\n\\n`."""
    for chunk in chunks:
        yield b"data: " + json.dumps(chunk).encode() + b"\n\n"
    yield b"data: [DONE]\n\n"
