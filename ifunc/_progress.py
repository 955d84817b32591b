"""Progress bars (tqdm) for ifunc's long loops; ``progress=False`` silences them, ``None`` = only on a terminal."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, TypeVar, overload

T = TypeVar("T")


@overload
def progress_bar(
    iterable: Iterable[T], *, total: int | None = None, desc: str, progress: bool | None
) -> Iterable[T]: ...


@overload
def progress_bar(iterable: None = None, *, total: int | None = None, desc: str, progress: bool | None) -> Any: ...


def progress_bar(iterable=None, *, total=None, desc: str, progress: bool | None):
    """``tqdm(iterable)`` (or a manual bar with ``update``/``close`` when ``iterable`` is None), or the iterable
    itself when silenced."""
    if progress is False:
        return iterable if iterable is not None else _Silent()
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is a dependency, but a missing progress bar must never stop a run
        return iterable if iterable is not None else _Silent()
    return tqdm(iterable, total=total, desc=desc, disable=None if progress is None else not progress, leave=False)


class _Silent:
    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass
