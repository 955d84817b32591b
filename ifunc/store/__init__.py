"""HDF5 disk I/O of ifunc: score stores (written chunk by chunk, resumable, checked) and tensor files.

``scores`` writes and resumes score stores (``_meta``: their metadata; ``_trust``: the checks a store must pass to
be resumed or read), ``merge`` merges per-rank stores,
``reading`` reads finished ones, ``_hdf5`` holds the file primitives (locks, atomic creation, files of
named tensor groups) and ``_disk`` what goes wrong on disk (refused writes, temporaries of killed processes).
Nothing here knows a method or a scorer; it imports only the base modules.
"""

from .._data import fingerprint
from ._hdf5 import read_tensor_groups, write_tensor_groups
from ._trust import check_fingerprint
from .merge import merge_parts, part_path
from .reading import ChecksumError, load_scores, read_blocks, top_k
from .scores import ScoreWriter, recorded_chunk_size, remove_store

__all__ = [
    "read_blocks",
    "ChecksumError",
    "ScoreWriter",
    "load_scores",
    "top_k",
    "fingerprint",
    "check_fingerprint",
    "remove_store",
    "recorded_chunk_size",
    "part_path",
    "merge_parts",
    "write_tensor_groups",
    "read_tensor_groups",
]
