"""Every bad input gets a named error (or the exact correct result): one table, one row per input.

A row is ``(id, call, exception, words)``: ``call(p)`` runs on a fresh small problem ``p`` and must raise
``exception`` whose message matches ``words`` (a regex). Rows that apply to several methods are expanded
over them. The store rows (resume, locks, checksums, read-only) live in ``tests/test_store_trust.py``.

Gradient-index rows (:data:`INDEX_ROWS`) are ``(id, call, exception, words)`` with ``call(p, folder)``: they write
index files into an empty ``folder``.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import h5py
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import ifunc
from ifunc.testing import mlp_problem


def _problem():
    model, params, loss, (x, y) = mlp_problem(seed=0, sizes=(3, 4, 2), n=8)
    return SimpleNamespace(model=model, params=params, loss=loss, x=x, y=y, data=(x, y))


def _ekfac(p, **kw):
    kw.setdefault("damping", 0.1)
    return ifunc.ihvp_ekfac(p.loss, p.params, p.data, model=p.model, **kw)


#: builders of a closure on the problem, for rows that apply to every method family
BUILDERS = {
    "explicit": lambda p: ifunc.ihvp_explicit(p.loss, p.params, p.data, damping=0.1),
    "cg": lambda p: ifunc.ihvp_cg(p.loss, p.params, p.data, damping=0.1),
    "arnoldi": lambda p: ifunc.ihvp_arnoldi(p.loss, p.params, p.data, damping=0.1, rank=4),
    "ekfac": _ekfac,
}


def _with_inf(p, where="train"):
    x = p.x.clone()
    x[3] = float("inf")
    return (x, p.y) if where == "train" else (x[2:5], p.y[2:5])


def _mean_loss(p):
    return lambda q, b: F.cross_entropy(ifunc.call(p.model, q, b[0]), b[1])


def _shuffled(p):
    return DataLoader(TensorDataset(p.x, p.y), batch_size=4, shuffle=True)


def _train_mode(p, layer):
    model = nn.Sequential(nn.Linear(3, 4), layer, nn.Tanh(), nn.Linear(4, 2)).double().train()
    params = ifunc.params_of(model)
    loss = ifunc.output_loss(
        lambda q, b: ifunc.call(model, q, b[0]), lambda o, b: F.cross_entropy(o, b[1], reduction="sum")
    )
    return model, params, loss


def _lstm(p):
    model = nn.LSTM(3, 2, batch_first=True).double()
    params = ifunc.params_of(model)
    loss = lambda q, b: ifunc.call(model, q, b[0])[0].pow(2).sum()  # noqa: E731
    return ifunc.ihvp_ekfac(loss, params, (p.x[:, None, :],), model=model, modules=[""], damping=0.1)


def _one_shot(p):
    class Once:
        def __init__(self):
            self.used = False

        def __iter__(self):
            if self.used:
                return iter(())
            self.used = True
            return iter([p.data])

    return Once()


ROWS = [
    # --- silent wrong answers: NaN/inf, order, reduction, train mode
    *[
        (
            f"inf-train-{m}",
            lambda p, m=m: ifunc.attribute(
                p.loss, p.params, BUILDERS[m](p), _with_inf(p), (p.x[:2], p.y[:2]), chunk_size=4
            ),
            ValueError,
            "non-finite gradient for example 3 of train",
        )
        for m in ("explicit", "cg", "ekfac")
    ],
    *[
        (
            f"inf-query-{m}",
            lambda p, m=m: ifunc.attribute(p.loss, p.params, BUILDERS[m](p), p.data, _with_inf(p, "query")),
            ValueError,
            "non-finite gradient for example 1 of query",
        )
        for m in ("explicit", "cg", "ekfac")
    ],
    *[
        (
            f"inf-self-{m}",
            lambda p, m=m: ifunc.self_influence(p.loss, p.params, BUILDERS[m](p), _with_inf(p)),
            ValueError,
            "non-finite gradient for example 3 of train",
        )
        for m in ("explicit", "ekfac")
    ],
    *[
        (
            f"shuffled-train-{m}",
            lambda p, m=m: ifunc.attribute(p.loss, p.params, BUILDERS[m](p), _shuffled(p), p.data),
            ValueError,
            "train: the DataLoader shuffles.*shuffle=False",
        )
        for m in ("explicit", "ekfac")
    ],
    (
        "shuffled-query",
        lambda p: ifunc.attribute(p.loss, p.params, BUILDERS["cg"](p), p.data, _shuffled(p)),
        ValueError,
        "query: the DataLoader shuffles",
    ),
    (
        "shuffled-self",
        lambda p: ifunc.self_influence(p.loss, p.params, BUILDERS["ekfac"](p), _shuffled(p)),
        ValueError,
        "train: the DataLoader shuffles",
    ),
    (
        "shuffled-per-sample",
        lambda p: ifunc.per_sample_grads(p.loss, p.params, _shuffled(p)),
        ValueError,
        "the DataLoader shuffles",
    ),
    (
        "shuffled-fisher-fit",
        lambda p: (
            _ekfac(p, curvature="fisher", sample="categorical")
            and ifunc.ihvp_cg(
                ifunc.output_loss(p.loss.outputs, p.loss.loss_on_outputs, likelihood="categorical"),
                p.params,
                _shuffled(p),
                damping=0.1,
                curvature="fisher",
            )
        ),
        ValueError,
        "the DataLoader shuffles",
    ),
    *[
        (
            f"mean-reduced-{m}",
            lambda p, m=m: {
                "per_sample": lambda: ifunc.per_sample_grads(_mean_loss(p), p.params, p.data),
                "cg": lambda: ifunc.ihvp_cg(_mean_loss(p), p.params, p.data, damping=0.1),
                "ekfac": lambda: ifunc.ihvp_ekfac(
                    _mean_loss(p), p.params, p.data, model=p.model, curvature="empirical_fisher"
                ),
                "datainf": lambda: ifunc.ihvp_datainf(_mean_loss(p), p.params, p.data, damping=0.1),
                "measurement": lambda: ifunc.attribute(
                    p.loss, p.params, BUILDERS["ekfac"](p), p.data, p.data, measurement=_mean_loss(p)
                ),
            }[m](),
            ValueError,
            "looks mean-reduced.*reduction='sum'",
        )
        for m in ("per_sample", "cg", "ekfac", "datainf", "measurement")
    ],
    *[
        (
            f"train-mode-{name}-{m}",
            lambda p, layer=layer, m=m: (
                lambda model, params, loss: {
                    "cg": lambda: ifunc.ihvp_cg(loss, params, p.data, damping=0.1),
                    "ekfac": lambda: ifunc.ihvp_ekfac(loss, params, p.data, model=model, damping=0.1),
                    "grads": lambda: ifunc.per_sample_grads(loss, params, p.data),
                }[m]()
            )(*_train_mode(p, layer)),
            ValueError,
            rf"\({type(layer).__name__}\) is in train mode.*model.eval\(\)",
        )
        for name, layer in (("dropout", nn.Dropout(0.5)), ("batchnorm", nn.BatchNorm1d(4)))
        for m in ("cg", "ekfac", "grads")
    ],
    # --- shapes, types, values at the boundary
    (
        "wrong-vector-length",
        lambda p: BUILDERS["explicit"](p)(torch.zeros(5)),
        ValueError,
        r"expected a vector \[\d+\].*got \(5,\)",
    ),
    (
        "negative-damping",
        lambda p: ifunc.ihvp_cg(p.loss, p.params, p.data, damping=-1.0),
        ValueError,
        "damping must be a finite number >= 0",
    ),
    (
        "nan-damping",
        lambda p: ifunc.ihvp_explicit(p.loss, p.params, p.data, damping=float("nan")),
        ValueError,
        "damping must be a finite number >= 0",
    ),
    (
        "non-scalar-loss",
        lambda p: ifunc.ihvp_cg(lambda q, b: ifunc.call(p.model, q, b[0]), p.params, p.data, damping=0.1),
        ValueError,
        "must return a scalar tensor",
    ),
    (
        "unknown-curvature",
        lambda p: ifunc.ihvp_cg(p.loss, p.params, p.data, damping=0.1, curvature="gauss"),
        ValueError,
        "curvature='gauss' is not supported",
    ),
    (
        "ggn-without-split",
        lambda p: ifunc.ihvp_cg(lambda q, b: p.loss(q, b), p.params, p.data, damping=0.1, curvature="ggn"),
        TypeError,
        "needs the split outputs",
    ),
    (
        "fisher-without-likelihood",
        lambda p: ifunc.ihvp_cg(p.loss, p.params, p.data, damping=0.1, curvature="fisher"),
        TypeError,
        "samples labels from the model",
    ),
    (
        "ihvp-of-another-model",
        lambda p: ifunc.attribute(
            p.loss,
            p.params,
            (lambda o: ifunc.ihvp_explicit(o[2], o[1], o[3], damping=0.1))(mlp_problem(seed=0, sizes=(3, 6, 2))),
            p.data,
            p.data,
        ),
        ValueError,
        "built for .* parameters but params have",
    ),
    (
        "one-shot-iterator",
        lambda p: ifunc.ihvp_cg(p.loss, p.params, iter([p.data]), damping=0.1),
        TypeError,
        "one-shot iterator",
    ),
    ("list-of-tensors", lambda p: ifunc.per_sample_grads(p.loss, p.params, [p.x, p.y]), TypeError, "ambiguous"),
    (
        "one-shot-iterable-empty-on-second-pass",
        lambda p: ifunc.ihvp_cg(p.loss, p.params, _one_shot(p), damping=0.1),
        ValueError,
        "yielded no examples on a second pass",
    ),
    (
        "empty-query",
        lambda p: ifunc.attribute(p.loss, p.params, BUILDERS["cg"](p), p.data, (p.x[:0], p.y[:0])),
        ValueError,
        "query holds no examples",
    ),
    (
        "empty-query-ekfac",
        lambda p: ifunc.attribute(p.loss, p.params, BUILDERS["ekfac"](p), p.data, (p.x[:0], p.y[:0])),
        ValueError,
        "query holds no examples",
    ),
    (
        "unbatched-query",
        lambda p: ifunc.attribute(p.loss, p.params, BUILDERS["cg"](p), p.data, (p.x[0], p.y[0])),
        ValueError,
        "add a batch dimension",
    ),
    ("modules-empty", lambda p: _ekfac(p, modules=[]), ValueError, "modules=\\[\\] selects no layer"),
    ("unsupported-layer", _lstm, ValueError, "LSTM.*not support.*nn.Linear"),
    ("unknown-module", lambda p: _ekfac(p, modules=["nope"]), ValueError, "no sub-module named 'nope'"),
    (
        "rank-not-int",
        lambda p: ifunc.ihvp_arnoldi(p.loss, p.params, p.data, damping=0.1, rank=2.5),
        TypeError,
        "rank must be an int",
    ),
    (
        "rank-too-large",
        lambda p: ifunc.ihvp_arnoldi(p.loss, p.params, p.data, damping=0.1, rank=10_000),
        ValueError,
        "rank",
    ),
    (
        "query-dtype-mismatch",
        lambda p: ifunc.attribute(
            p.loss, {k: v.float() for k, v in p.params.items()}, BUILDERS["cg"](p), p.data, p.data
        ),
        RuntimeError,
        "dtype mismatch.*cast the data",
    ),
    (
        "params-on-meta",
        lambda p: ifunc.ihvp_cg(p.loss, {k: v.to("meta") for k, v in p.params.items()}, p.data, damping=0.1),
        ValueError,
        "meta",
    ),
    (
        "ihvp-error-given-data",
        lambda p: ifunc.ihvp_error(BUILDERS["cg"](p), BUILDERS["explicit"](p), queries=p.data),
        TypeError,
        "gradients",
    ),
    (
        "nan-params-ekfac",
        lambda p: ifunc.ihvp_ekfac(
            p.loss, {k: v * float("nan") for k, v in p.params.items()}, p.data, model=p.model, damping=0.1
        ),
        ValueError,
        "non-finite|NaN",
    ),
    (
        "nan-params-arnoldi",
        lambda p: ifunc.ihvp_arnoldi(
            p.loss, {k: v * float("nan") for k, v in p.params.items()}, p.data, damping=0.1, rank=3
        ),
        ValueError,
        "nan|NaN|non-finite",
    ),
    ("zero-damping-singular-ekfac", lambda p: _ekfac(p, damping=0.0, exclude=()), ValueError, "damping"),
    (
        "lissa-too-small-scale",
        lambda p: ifunc.ihvp_lissa(p.loss, p.params, p.data, damping=0.01, scale=1e-3, depth=40)(
            torch.ones(BUILDERS["explicit"](p).dim)
        ),
        ifunc.LissaDivergenceError,
        "diverged.*scale=0.001 is too small",
    ),
    (
        "cg-singular-ggn-no-damping",
        lambda p: ifunc.ihvp_cg(p.loss, p.params, p.data, damping=0.0, tol=1e-12, maxiter=500)(
            torch.randn(BUILDERS["explicit"](p).dim)
        ),
        (ValueError, ifunc.ConvergenceError),
        "ggn curvature is PSD.*damping > 0|did not converge",
    ),
    (
        "explicit-nearly-singular-float32",
        lambda p: ifunc.ihvp_from_matrix(
            torch.diag(torch.tensor([1.0, 1e-9, 0.5])), {"w": torch.zeros(3, dtype=torch.float32)}, damping=0.0
        ),
        ValueError,
        "numerically singular at damping 0.*use damping > 0",
    ),
    (
        "float16-overflow",
        lambda p: ifunc.attribute(
            lambda q, b: 1e4 * p.loss(q, b), p.params, BUILDERS["explicit"](p), p.data, p.data, dtype=torch.float16
        ),
        ValueError,
        "overflowed in torch.float16.*use float32 or bfloat16",
    ),
    (
        "token-mask-without-per-token",
        lambda p: ifunc.attribute(p.loss, p.params, BUILDERS["ekfac"](p), p.data, p.data, token_mask=lambda b: b),
        ValueError,
        "pass per_token=True",
    ),
    (
        "per-module-generic",
        lambda p: ifunc.attribute(p.loss, p.params, BUILDERS["cg"](p), p.data, p.data, per_module=True),
        ValueError,
        "need a Kronecker-family closure",
    ),
]


@pytest.mark.parametrize("row", ROWS, ids=[r[0] for r in ROWS])
def test_bad_input_gets_a_named_error(row):
    _, call, exception, words = row
    p = _problem()
    before = {k: v.clone() for k, v in p.model.state_dict().items()}
    with pytest.raises(exception, match=words):
        call(p)
    after = p.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # nothing of the user's model changed


def test_the_table_is_large_enough():
    assert len(ROWS) >= 40


# ---------------------------------------------------------------- the gradient index

#: a small index: chunks of 3 examples (8 examples: chunks 0..2), layer "2" projected, layer "0" dense
_INDEX = {"modules": ["2"], "layer_size": 2, "dense_size": 3, "chunk_size": 3, "progress": False}


def _index(p, out, **kw):
    """``build_index`` of the problem into ``out`` (a folder: ``out / "i.h5"``; anything else as given)."""
    out = out / "i.h5" if isinstance(out, Path) and out.is_dir() else out
    return ifunc.build_index(p.loss, p.params, p.data, out, model=p.model, **{**_INDEX, **kw})


def _index_query(p, index, query=None, params=None):
    """Scores of two queries against ``index`` with an explicit closure."""
    query = (p.x[:2], p.y[:2]) if query is None else query
    params = p.params if params is None else params
    return ifunc.attribute(p.loss, params, BUILDERS["explicit"](p), index, query, progress=False)


def _scores_at(p, path: Path) -> Path:
    """``path`` holding a finished score store of ``attribute(..., out=path)`` (not an index)."""
    ifunc.attribute(p.loss, p.params, BUILDERS["explicit"](p), p.data, (p.x[:2], p.y[:2]), out=path, progress=False)
    return path


def _flipped(p, folder: Path):
    """An index whose chunk 1 (examples 3..5) has one stored float's bytes flipped on disk, reopened."""
    index = _index(p, folder)
    with h5py.File(index.path, "r") as f:  # scores [dim, n] float32, contiguous: row 1, column 4 lies in chunk 1
        at = f["scores"].id.get_offset() + 4 * (index.n * 1 + 4)
    with open(index.path, "r+b") as f:
        f.seek(at)
        word = f.read(4)
        f.seek(at)
        f.write(bytes(b ^ 0xFF for b in word))
    return ifunc.open_index(index.path)


def _unfinished(p, folder: Path) -> Path:
    """An index whose build stopped in its second chunk (chunk 0 on disk): the path."""

    def stopping(q, b):
        if b[0].shape[0] == 3 and torch.equal(b[0], p.x[3:6]):
            raise RuntimeError("stop")
        return p.loss(q, b)

    path = folder / "i.h5"
    with pytest.raises(RuntimeError, match="stop"):
        ifunc.build_index(stopping, p.params, p.data, path, model=p.model, identity="stops in chunk 1", **_INDEX)
    return path


def _text_file(path: Path) -> Path:
    path.write_text("not an HDF5 file")
    return path


INDEX_ROWS = [
    (
        "index-open-a-score-store",
        lambda p, folder: ifunc.open_index(
            ifunc.attribute(p.loss, p.params, BUILDERS["explicit"](p), p.data, p.data, out=folder / "s.h5")
        ),
        ValueError,
        r"s\.h5 is a score store \(explicit scores\) but not a gradient index.*ifunc.load_scores",
    ),
    (
        "index-open-a-foreign-file",
        lambda p, folder: ifunc.open_index(_text_file(folder / "x.h5")),
        ValueError,
        r"x\.h5 cannot be read as an ifunc score store",
    ),
    (
        "index-other-params",
        lambda p, folder: _index_query(p, _index(p, folder), params={k: v + 0.01 for k, v in p.params.items()}),
        ValueError,
        "the index holds gradients at other parameters.*build a new index for these",
    ),
    (
        "index-other-dtype-params",
        lambda p, folder: _index_query(p, _index(p, folder), params={k: v.float() for k, v in p.params.items()}),
        ValueError,
        "built at torch.float64 parameters, these are torch.float32",
    ),
    (
        "index-damaged-chunk-query",
        lambda p, folder: _index_query(p, _flipped(p, folder)),
        ValueError,
        r"i\.h5: chunk 1 \(examples 3\.\.5\) fails its checksum.*overwrite=True",
    ),
    (
        "index-damaged-chunk-matrix",
        lambda p, folder: _flipped(p, folder).matrix(),
        ValueError,
        r"i\.h5: chunk 1 \(examples 3\.\.5\) fails its checksum",
    ),
    (
        "index-unfinished-opened",
        lambda p, folder: ifunc.open_index(_unfinished(p, folder)),
        ValueError,
        r"unfinished gradient index \(2 of 3 chunks missing\).*re-run the same build_index",
    ),
    ("index-out-none", lambda p, folder: _index(p, None), ValueError, "out= must be the path of the index file"),
    (
        "index-out-a-folder",
        lambda p, folder: ifunc.build_index(p.loss, p.params, p.data, folder, model=p.model, **_INDEX),
        ValueError,
        "is a directory; give a file path",
    ),
    *[
        (f"index-{name}", lambda p, folder, kw=kw: _index(p, folder, **kw), ValueError, words)
        for name, kw, words in (
            ("layer-size-zero", {"layer_size": 0}, "layer_size must be a positive int, got 0"),
            ("layer-size-float", {"layer_size": 2.5}, "layer_size must be a positive int, got 2.5"),
            ("layer-size-bool", {"layer_size": True}, "layer_size must be a positive int, got True"),
            ("layer-size-triple", {"layer_size": (1, 2, 3)}, r"layer_size must be an int k or a pair \(k_o, k_a\)"),
            ("dense-size-zero", {"dense_size": 0}, "dense_size must be a positive int, got 0"),
            ("dense-size-negative", {"dense_size": -4}, "dense_size must be a positive int, got -4"),
            ("seed-negative", {"seed": -1}, "seed must be a non-negative int, got -1"),
            ("seed-float", {"seed": 1.5}, "seed must be a non-negative int, got 1.5"),
            ("seed-string", {"seed": "0"}, "seed must be a non-negative int, got '0'"),
        )
    ],
    (
        "index-exclude-non-dict-params",
        lambda p, folder: ifunc.build_index(
            p.loss, list(p.params.values()), p.data, folder / "i.h5", exclude=["0.bias"]
        ),
        TypeError,
        "exclude= names entries of a dict of parameters; params is not a dict",
    ),
    (
        "index-modules-without-model",
        lambda p, folder: ifunc.build_index(p.loss, p.params, p.data, folder / "i.h5", modules=["2"]),
        ValueError,
        "modules= chooses layers of model=; pass model= too, or drop modules=",
    ),
    (
        "index-query-unbatched",
        lambda p, folder: _index_query(p, _index(p, folder), query=(p.x[0], p.y[0])),
        ValueError,
        "add a batch dimension",
    ),
    (
        "index-query-empty",
        lambda p, folder: _index_query(p, _index(p, folder), query=(p.x[:0], p.y[:0])),
        ValueError,
        "query holds no examples",
    ),
    (
        "index-query-wrong-width",  # the model's own error: the query never reaches the index
        lambda p, folder: _index_query(p, _index(p, folder), query=(p.x[:2, :2], p.y[:2])),
        RuntimeError,
        "shapes cannot be multiplied",
    ),
    (
        "index-query-non-finite",
        lambda p, folder: _index_query(p, _index(p, folder), query=(p.x[:2] * float("inf"), p.y[:2])),
        ValueError,
        "non-finite gradient for example 0 of query",
    ),
    (
        "index-path-as-train",  # the file's path where the opened index (or training data) goes
        lambda p, folder: _index_query(p, str(_index(p, folder).path)),
        TypeError,
        r"train is the path .*ifunc\.open_index\(path\)",
    ),
    (
        "index-built-over-a-score-store",  # attribute(out=)'s store is not an index to resume: named, left untouched
        lambda p, folder: _index(p, _scores_at(p, folder / "s.h5")),
        ValueError,
        "is a score store file, not a gradient index file",
    ),
    (
        "scores-written-over-an-index",
        lambda p, folder: ifunc.attribute(
            p.loss, p.params, BUILDERS["explicit"](p), p.data, (p.x[:2], p.y[:2]), out=_index(p, folder).path
        ),
        ValueError,
        "is a gradient index file, not a score store file",
    ),
    (
        "index-damping-as-a-string",  # float("1e-3") would read it: a typo is refused, not guessed
        lambda p, folder: ifunc.ihvp_projected(_index(p, folder), damping="1e-3"),
        TypeError,
        "damping must be a number, got str",
    ),
    (
        "index-passed-as-query",  # an index is a NamedTuple: it must not be read as a batch of queries
        lambda p, folder: ifunc.attribute(p.loss, p.params, BUILDERS["explicit"](p), p.data, _index(p, folder)),
        TypeError,
        "gradient index.*train",
    ),
]


@pytest.mark.parametrize("row", [pytest.param(r, id=r[0]) for r in INDEX_ROWS])
def test_bad_index_input_gets_a_named_error(row, tmp_path):
    _, call, exception, words = row
    p = _problem()
    before = {k: v.clone() for k, v in p.model.state_dict().items()}
    with pytest.raises(exception, match=words):
        call(p, tmp_path)
    after = p.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
