"""n and best_of: which candidates of a prompt become which choices (SEMANTICS 8).

Knows: candidate -> choice index, best_of ranking. Does not know: sampling, text,
response shapes (it yields decode.Pieces tagged with their choice index).

    index = prompt_index * n + rank

best_of == n: no ranking; candidate j is choice j, streamed as it is generated.
best_of > n (never streamed): all best_of candidates are generated, ranked by the
mean raw logprob of the tokens counted in completion_tokens (stop and EOS tokens
included), ties to the lower candidate index, and the n best are returned best first.
OpenAI: "Generates best_of completions server-side and returns the 'best' (the one
with the highest log probability per token)."
"""

from __future__ import annotations

from typing import Iterator

from refcomplete.decode import Piece, Plan, generate


def choice_pieces(model, prompt_ids, plan: Plan, n: int, prompt_index: int
                  ) -> Iterator[tuple[int, Piece]]:
    """(choice index, piece) for one prompt's n choices, from plan.rows = best_of candidates.

    The pieces of best_of candidates that are not returned come with index None: they
    count in usage.completion_tokens and are shown nowhere else."""
    pieces = generate(model, list(prompt_ids), plan)
    if plan.rows == n:
        for piece in pieces:
            yield prompt_index * n + piece.row, piece
        return
    by_row: list[list[Piece]] = [[] for _ in range(plan.rows)]
    for piece in pieces:
        by_row[piece.row].append(piece)
    for rank, row in enumerate(ranking(by_row)):
        for piece in by_row[row]:
            yield (prompt_index * n + rank if rank < n else None), piece


def ranking(by_row: list[list[Piece]]) -> list[int]:
    """Candidate rows, best first: mean raw logprob of generated tokens, ties to lower row."""
    return sorted(range(len(by_row)), key=lambda r: (-mean_raw_logprob(by_row[r]), r))


def mean_raw_logprob(pieces: list[Piece]) -> float:
    """Mean raw logprob over a candidate's generated tokens (0.0 when it generated none)."""
    raws = [t.raw for p in pieces if p.generated for _, t in p.tokens]
    total = 0.0
    for v in raws:          # strictly left to right (Python >= 3.12's sum() compensates)
        total = total + v
    return total / len(raws) if raws else 0.0
