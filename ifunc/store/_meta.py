"""The metadata of a score store: JSON that defines the scores, compared with a tolerance for floats."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator

__all__ = ["RTOL", "describe_difference", "read_meta", "as_read_back"]

RTOL = 1e-6  #: relative tolerance for floats of the meta (eigenvalues may differ in the last bits between processes)


def as_read_back(meta: dict) -> dict:
    """``meta`` as it reads back from the file (tuples become lists)."""
    return json.loads(json.dumps(meta, sort_keys=True))


def _same(a, b) -> bool:
    numbers = all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in (a, b))
    if numbers and (isinstance(a, float) or isinstance(b, float)):
        return (math.isnan(a) and math.isnan(b)) or abs(a - b) <= RTOL * max(abs(a), abs(b))
    return a == b


class _Absent:
    """A key one side does not record (an option left at its default, e.g. ``normalize=None``)."""

    def __repr__(self) -> str:
        return "nothing (not recorded: the default)"


_ABSENT = _Absent()


def _differences(found, wanted, where: str = "") -> Iterator[str]:
    if isinstance(found, dict) and isinstance(wanted, dict):
        for k in sorted(set(found) | set(wanted)):
            if where or k != "versions":
                yield from _differences(found.get(k, _ABSENT), wanted.get(k, _ABSENT), f"{where}.{k}" if where else k)
    elif isinstance(found, list) and isinstance(wanted, list) and len(found) == len(wanted):
        for i, (a, b) in enumerate(zip(found, wanted)):
            yield from _differences(a, b, f"{where}[{i}]")
    elif not _same(found, wanted):
        yield f"{where}: file has {_short(found)}, this call has {_short(wanted)}"


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def describe_difference(found: dict, wanted: dict) -> str:
    diffs = list(_differences(found, wanted))
    more = f"; and {len(diffs) - 6} more" if len(diffs) > 6 else ""
    return "; ".join(diffs[:6]) + more


def read_meta(f) -> dict:
    raw = f["meta"][()] if "meta" in f else f.attrs["meta"]
    return json.loads(raw.decode() if isinstance(raw, bytes) else raw)
