"""The Kronecker factors' eigendecompositions: their dtype, recorded with the factors; shared inputs decomposed once.

``eigen_dtype=None`` (the default) decomposes in the params' precision (float32 models: float32; float64: float64).
A float32 basis against a float64 one, both applied by a float32 closure: relative difference of the iHVPs below
1e-4 on small random problems (measured ≤ 2e-6); the benchmark ``benchmarks/eigen_precision.py`` compares the scores
on language models.
"""

import h5py
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import ifunc
from ifunc.ihvp.kronecker import eigenbases
from ifunc.testing import mlp_problem, rel_error

from .distributed_worker import branches_problem


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_the_default_decomposes_in_the_params_precision_and_says_so(dtype, tmp_path):
    model, params, loss, data = mlp_problem(sizes=(3, 5, 2), dtype=dtype)
    f = ifunc.fit_kronecker_factors(loss, params, data, model=model)
    name = str(dtype).removeprefix("torch.")
    assert f.eigen_dtype == name
    for lf in f.factors.values():
        assert lf.eig_A.dtype == lf.eig_S.dtype == lf.ekfac.dtype == lf.Q_S.dtype == dtype  # type: ignore[union-attr]
    assert ifunc.ihvp_ekfac(loss, params, f, model=model, damping=0.1).info["eigen_dtype"] == name
    ifunc.save_factors(tmp_path / "f.h5", f, params)
    assert ifunc.load_factors(tmp_path / "f.h5", params).eigen_dtype == name
    assert f"eigen_dtype='{name}'" in repr(f)


def test_float64_decompositions_of_a_float32_model_are_recorded():
    model, params, loss, data = mlp_problem(sizes=(3, 5, 2), dtype=torch.float32)
    f = ifunc.fit_kronecker_factors(loss, params, data, model=model, eigen_dtype=torch.float64)
    assert f.eigen_dtype == "float64"
    assert {lf.eig_A.dtype for lf in f.factors.values()} == {torch.float64}
    assert {lf.Q_A.dtype for lf in f.factors.values()} == {torch.float32}  # type: ignore[union-attr]


def test_a_factor_file_that_does_not_record_it_loads_as_not_recorded(tmp_path):
    model, params, loss, data = mlp_problem(sizes=(3, 5, 2))
    f = ifunc.fit_kronecker_factors(loss, params, data, model=model)
    ifunc.save_factors(tmp_path / "f.h5", f, params)
    with h5py.File(tmp_path / "f.h5", "r+") as h:  # as a release before the field wrote it
        import json

        meta = json.loads(str(h.attrs["meta"]))
        del meta["eigen_dtype"]
        h.attrs["meta"] = json.dumps(meta, sort_keys=True)
    old = ifunc.load_factors(tmp_path / "f.h5", params)
    assert old.eigen_dtype is None and "eigen_dtype" not in repr(old)
    ih = ifunc.ihvp_kfac(loss, params, old, model=model, damping=0.1)
    assert ih.info["eigen_dtype"] is None
    v = torch.randn(2, ifunc.flatten(params)[0].numel(), dtype=torch.float64)
    torch.testing.assert_close(ih(v), ifunc.ihvp_kfac(loss, params, f, model=model, damping=0.1)(v))


def test_eigen_dtype_must_be_a_float_dtype():
    model, params, loss, data = mlp_problem(sizes=(3, 5, 2))
    with pytest.raises(TypeError, match=r"eigen_dtype must be torch.float64, torch.float32 or None"):
        ifunc.fit_kronecker_factors(loss, params, data, model=model, eigen_dtype=torch.float16)


@settings(max_examples=12, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    hidden=st.integers(2, 12),
    damping=st.sampled_from([1e-3, 1e-2, 1e-1]),
    method=st.sampled_from(["ekfac", "kfac"]),
)
def test_float32_bases_give_a_float32_closure_the_iHVPs_of_float64_bases(seed, hidden, damping, method):
    """Both closures apply in float32; only the decompositions' dtype differs: relative difference < 1e-4."""
    model, params, loss, data = mlp_problem(seed=seed, sizes=(4, hidden, 3), n=20, dtype=torch.float32)
    build = ifunc.ihvp_ekfac if method == "ekfac" else ifunc.ihvp_kfac
    got = build(loss, params, data, model=model, damping=damping, eigen_dtype=torch.float32)
    ref = build(loss, params, data, model=model, damping=damping, eigen_dtype=torch.float64)
    V = torch.randn(3, ifunc.flatten(params)[0].numel(), generator=torch.Generator().manual_seed(seed))
    assert rel_error(got(V).double(), ref(V).double()) < 1e-4


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_layers_reading_one_input_share_one_decomposition(dtype, monkeypatch):
    model, params, loss, train = branches_problem(dtype)
    calls = []
    decompose = eigenbases.symmetric_eig
    monkeypatch.setattr(eigenbases, "symmetric_eig", lambda M, dt: calls.append(M.shape) or decompose(M, dt))
    f = ifunc.fit_kronecker_factors(loss, params, train, model=model)
    left, right, head = (f.factors[k] for k in ("left", "right", "head"))
    assert left.A is not None and right.A is not None and torch.equal(left.A, right.A)
    assert right.Q_A is left.Q_A and torch.equal(right.eig_A, left.eig_A)
    assert len(calls) == 5  # A of left and head, S of all three
    for lf in (left, right, head):  # each layer's decomposition is of its own A
        assert lf.A is not None and lf.Q_A is not None
        rebuilt = lf.Q_A @ torch.diag(lf.eig_A) @ lf.Q_A.T
        assert rel_error(rebuilt.double(), lf.A.double()) < (1e-5 if dtype == torch.float32 else 1e-12)
    # the closure built from shared bases is the closure of the factors as they are (nothing is shared wrongly)
    query = (train[0][0][:3] + 0.1, train[0][1][:3])
    scores = ifunc.attribute(loss, params, ifunc.ihvp_ekfac(loss, params, f, model=model, damping=0.1), train, query)
    G, Q = ifunc.per_sample_grads(loss, params, train), ifunc.per_sample_grads(loss, params, query)
    dense = ifunc.ihvp_ekfac(loss, params, f, damping=0.1)  # no model=: the generic scorer, its own path
    torch.testing.assert_close(scores, Q @ dense(G).T, rtol=1e-4 if dtype == torch.float32 else 1e-10, atol=0)


def test_distinct_covariances_are_never_shared():
    a = torch.eye(3)
    b = torch.eye(3)
    c = torch.eye(3).flip(0)  # the same sum as a, another trace
    d = torch.tensor([[1.0, 0.5, 0.0], [0.5, 1.0, 0.0], [0.0, 0.0, 1.0]])
    e = torch.tensor([[1.0, 0.0, 0.5], [0.0, 1.0, 0.0], [0.5, 0.0, 1.0]])  # same sum and trace as d
    assert eigenbases.shared_inputs({"a": a, "b": b, "c": c, "d": d, "e": e, "none": None}) == {"b": "a"}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_a_large_factor_decomposes_on_all_threads_exactly(dtype, monkeypatch):
    n = eigenbases.THREADED_EIGH
    X = torch.randn(n, n + 8, generator=torch.Generator().manual_seed(0), dtype=dtype)
    M = X @ X.T / n
    seen = []
    eigh = torch.linalg.eigh
    monkeypatch.setattr(torch.linalg, "eigh", lambda A: seen.append(torch.get_num_threads()) or eigh(A))
    w, Q = eigenbases.symmetric_eig(M, dtype)
    assert seen == [torch.get_num_threads()]
    assert rel_error((Q * w) @ Q.T, M) < (1e-5 if dtype == torch.float32 else 1e-12)
    eigenbases.symmetric_eig(M[:8, :8], dtype)
    assert seen[-1] == 1  # a small factor: one thread


def test_a_float32_decomposition_that_fails_is_redone_in_float64(monkeypatch):
    M = torch.tensor([[2.0, 1.0], [1.0, 2.0]])
    eigh = torch.linalg.eigh

    def flaky(A):
        if A.dtype == torch.float32:
            raise eigenbases.LinAlgError("linalg.eigh: the algorithm failed to converge")
        return eigh(A)

    monkeypatch.setattr(torch.linalg, "eigh", flaky)
    w, Q = eigenbases.symmetric_eig(M, torch.float32)
    assert w.dtype == Q.dtype == torch.float32
    torch.testing.assert_close(w, torch.tensor([1.0, 3.0], dtype=torch.float32))
    with pytest.raises(eigenbases.LinAlgError, match="failed to converge"):  # float64 failing too is not hidden
        monkeypatch.setattr(torch.linalg, "eigh", lambda A: flaky(A.float()))
        eigenbases.symmetric_eig(M, torch.float64)
    model, params, loss, data = mlp_problem(sizes=(3, 5, 2))
    # every factor's eigh fails (2-D); the GGN's batched per-example output Hessians (3-D) still decompose
    monkeypatch.setattr(torch.linalg, "eigh", lambda A: flaky(A.float()) if A.dim() == 2 else eigh(A))
    with pytest.raises(ValueError, match=r"eigendecomposition of a factor of layer '0' failed in float64 too"):
        ifunc.fit_kronecker_factors(loss, params, data, model=model)


def test_other_errors_inside_eigh_are_not_retried(monkeypatch):
    def no_memory(A):
        raise RuntimeError("DefaultCPUAllocator: not enough memory")

    monkeypatch.setattr(torch.linalg, "eigh", no_memory)
    with pytest.raises(RuntimeError, match="not enough memory"):
        eigenbases.symmetric_eig(torch.eye(3, dtype=torch.float32), torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_store_metadata_names_float32_bases_only(dtype):
    """Factors decomposed in float64 (and old ones that do not say) describe themselves as before the field existed,
    so their stores resume; float32 bases are told apart."""
    model, params, loss, data = mlp_problem(sizes=(3, 5, 2), dtype=dtype)
    f = ifunc.fit_kronecker_factors(loss, params, data, model=model)
    described = ifunc.ihvp_ekfac(loss, params, f, model=model, damping=0.1).describe()["method_info"]
    assert described.get("eigen_dtype") == ("float32" if dtype == torch.float32 else None)
    old = f._replace(eigen_dtype=None)
    assert "eigen_dtype" not in ifunc.ihvp_ekfac(loss, params, old, model=model, damping=0.1).describe()["method_info"]
