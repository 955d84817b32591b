"""Merging per-rank score stores (``torchrun`` with ``out=``) into one, resumably."""

from __future__ import annotations

from pathlib import Path

from .scores import ScoreWriter, remove_store

__all__ = ["part_path", "merge_parts"]


def part_path(out, rank: int, size: int) -> Path:
    """File of one rank's columns: ``out.rank{r}of{W}``."""
    out = Path(out)
    return out.with_name(f"{out.name}.rank{rank}of{size}")


def merge_parts(out, size: int, final_args: dict, part_args, chunks_of) -> None:
    """Copy the finished chunks of the per-rank stores ``out.rank{r}of{W}`` into ``out``, then delete them.

    Rank ``r``'s local chunk ``j`` is global chunk ``chunks_of(r)[j]``; its columns are checked against their
    checksum and copied with their fingerprint. Resumable: chunks already in ``out`` are not copied again.
    ``part_args(r)`` gives the :class:`ScoreWriter` arguments of rank ``r``'s store.

    Raises:
      ValueError: chunks are still missing after the merge (a rank did not finish).
    """
    with ScoreWriter(out, **final_args) as final:
        for r in range(size):
            path = part_path(out, r, size)
            if final.read_only or not path.exists():
                continue
            with ScoreWriter(path, **part_args(r)) as part:
                owned = chunks_of(r)
                for j in sorted(part.done):
                    if owned[j] not in final.done:
                        final.write(owned[j], part.read(j), part.fingerprint(j))
        missing = final.n_chunks - len(final.done)
        n_chunks = final.n_chunks
    if missing:
        raise ValueError(f"{out}: {missing} of {n_chunks} chunks are missing after the merge")
    for r in range(size):
        remove_store(part_path(out, r, size))


# ---------------------------------------------------------------- tensor files (Kronecker factors)
