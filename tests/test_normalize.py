"""Normalised scores, ``attribute(..., normalize="cosine" | "relatif")``, and the note on per-example solves.

With ``t(g) = gᵀ (H + λI)^{-1} g`` (the closure's quadratic form), ``raw[q, i] = Q̃_qᵀ g_i``:
``cosine = raw / (√t(∇f(z_q)) √t(g_i))`` and ``relatif = raw / √t(g_i)``. Every row of the method table is checked
against these formulas built from dense per-sample gradients and the closure applied to them, and the training terms
against :func:`ifunc.self_influence`. Then each path: per-module and per-token columns, score stores (round trip,
crash and resume, a resume under another normalisation refused), top-k sinks, a gradient index, zero gradients,
the process group (``torchrun``, two gloo ranks: this file is its own worker) and the :class:`ifunc.CostWarning` of
closures that solve once per training example.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import ifunc
from ifunc import distributed, language, store
from ifunc.testing import TinyGPT

from .methods import METHODS, Method
from .problems import Problem, ggn, make_problem

#: the problem every row runs on (its ``fixed`` applied): a 3-4-3 tanh MLP, d = 31, ten training examples
SPEC: dict[str, Any] = {"seed": 3, "sizes": (3, 4, 3), "n": 10, "activation": nn.Tanh, "task": "classification"}
N_QUERY = 3
ROOT = Path(__file__).resolve().parent.parent


def _closure(method: Method, problem: Problem) -> ifunc.IHVP:
    """The row's closure at λ = λ_max(GGN) / 2 (well conditioned: LiSSA's series converges fast)."""
    return method.build(problem, 0.5 * float(torch.linalg.eigvalsh(ggn(problem)).max()))


def _query(method: Method):
    """N_QUERY examples of the row's task from another seed (not training examples)."""
    return make_problem(**{**SPEC, **method.fixed, "seed": SPEC["seed"] + 100, "n": N_QUERY}).data


def _quiet(fn, *args, **kwargs):
    """``fn(*args, **kwargs)`` with the ifunc.CostWarning of CG and LiSSA silenced (tested on its own below)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ifunc.CostWarning)
        return fn(*args, **kwargs)


def _dense(closure, problem: Problem, query) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(raw [q, n], t_q [q], t_i [n])`` from dense per-sample gradients and the closure applied to them."""
    G = ifunc.per_sample_grads(problem.loss, problem.params, problem.data)
    Q = ifunc.per_sample_grads(problem.loss, problem.params, query)
    Qp, Gp = closure(Q), closure(G)
    return Qp @ G.T, (Q * Qp).sum(dim=1), (G * Gp).sum(dim=1)


def _close(got: torch.Tensor, want: torch.Tensor, rtol: float) -> None:
    """``|got − want| ≤ rtol · max|want|`` entrywise, with the worst ratio in the message."""
    err = float((got - want).abs().max()) / float(want.abs().max())
    assert got.shape == want.shape and err <= rtol, f"max |got − want| / max|want| = {err:.3g} > {rtol:.1g}"


# ---------------------------------------------------------------- the formulas, every method of the table


@pytest.mark.parametrize("method", METHODS, ids=str)
def test_normalised_scores_follow_their_formulas(method):
    """Cosine and RelatIF equal the dense formulas; the train terms are self_influence's values; chunking is free."""
    problem, query = method.problem(SPEC), _query(method)
    closure = _closure(method, problem)
    raw, t_q, t_i = _dense(closure, problem, query)
    rtol = max(10 * method.rtol, 1e-10)  # the row's linearity tolerance (CG: a solve stopped at its tol)
    args = (problem.loss, problem.params, closure, problem.data, query)
    cosine = _quiet(ifunc.attribute, *args, normalize="cosine", progress=False)
    relatif = _quiet(ifunc.attribute, *args, normalize="relatif", chunk_size=3, progress=False)
    _close(cosine, raw / (t_q[:, None].sqrt() * t_i[None, :].sqrt()), rtol)
    _close(relatif, raw / t_i[None, :].sqrt(), rtol)
    self_terms = _quiet(ifunc.self_influence, problem.loss, problem.params, closure, problem.data, progress=False)
    _close(relatif * self_terms.sqrt(), ifunc.attribute(*args, progress=False), rtol)
    assert bool((t_i > 0).all() and (t_q > 0).all())  # positive definite: every term a squared norm


@given(seed=st.integers(0, 2**16), n=st.integers(2, 7))
def test_cosine_of_the_train_set_with_itself(seed, n):
    """Query = train: the cosine matrix is symmetric with ones on the diagonal and entries in [-1, 1]; RelatIF
    ranks every query's training examples exactly like the cosine (they differ by a positive factor per row)."""
    model, params, loss, data = make_problem(seed=seed, sizes=(2, 3, 2), n=n, activation=nn.Tanh, task="regression")
    closure = ifunc.ihvp_explicit(loss, params, data, damping=0.1)
    cos = ifunc.attribute(loss, params, closure, data, data, normalize="cosine", progress=False)
    rel = ifunc.attribute(loss, params, closure, data, data, normalize="relatif", progress=False)
    torch.testing.assert_close(cos, cos.T, rtol=0, atol=1e-12)
    torch.testing.assert_close(cos.diagonal(), torch.ones(n), rtol=0, atol=1e-12)
    assert float(cos.abs().max()) <= 1 + 1e-12
    ratio = rel / cos  # = √t_q per row
    torch.testing.assert_close(ratio, ratio[:, :1].expand_as(ratio), rtol=1e-10, atol=0)


# ---------------------------------------------------------------- Kronecker paths: per module, per token


def test_kronecker_per_module_columns_sum_to_the_normalised_scores():
    """Per-module slices are divided by the whole example's terms, so they sum to the normalised scores."""
    method = next(m for m in METHODS if m.name == "ekfac")
    problem, query = method.problem(SPEC), _query(method)
    closure = _closure(method, problem)
    args = (problem.loss, problem.params, closure, problem.data, query)
    for how in ("cosine", "relatif"):
        whole = ifunc.attribute(*args, normalize=how, progress=False)
        per = ifunc.attribute(*args, normalize=how, per_module=True, chunk_size=4, progress=False)
        assert per.shape == (2, N_QUERY, SPEC["n"])
        torch.testing.assert_close(per.sum(dim=0), whole, rtol=1e-10, atol=1e-12)


def _lm():
    torch.manual_seed(0)
    model = TinyGPT(vocab=11, width=8, heads=2, layers=1, context=7).double().eval()
    ids = torch.randint(0, 11, (5, 7), generator=torch.Generator().manual_seed(1))
    loss = language.causal_lm_loss(lambda p, b: ifunc.call(model, p, b["input_ids"], b.get("attention_mask")))
    return model, ifunc.params_of(model), loss, {"input_ids": ids}


def test_per_token_scores_are_divided_by_the_whole_examples_terms():
    """A tiny GPT with EK-FAC: per-token cosine / RelatIF sum over positions to the normalised pairwise scores,
    and those follow the formulas (the closure applied to the dense gradients of the tracked layers)."""
    model, params, loss, data = _lm()
    closure = ifunc.ihvp_ekfac(loss, params, data, model=model, exclude=language.untracked(model, params), damping=0.1)
    query = {"input_ids": data["input_ids"][:2]}
    problem = Problem(model, params, loss, data)  # type: ignore[arg-type]  # a batch dict, not (x, y)
    raw, t_q, t_i = _dense(closure, problem, query)
    for how, want in (("cosine", raw / (t_q[:, None] * t_i[None, :]).sqrt()), ("relatif", raw / t_i.sqrt())):
        pair = ifunc.attribute(loss, params, closure, data, query, normalize=how, progress=False)
        tok = ifunc.attribute(loss, params, closure, data, query, normalize=how, per_token=True, chunk_size=2)
        assert tok.shape == (2, 5, 7)
        _close(pair, want, 1e-9)
        _close(tok.sum(dim=-1), pair, 1e-9)


# ---------------------------------------------------------------- zero gradients


def _weighted(method: str):
    """The SPEC problem with per-example weights in the loss: weight 0 makes an example's gradient exactly 0."""
    model, params, _, (x, y) = make_problem(**SPEC)
    w = torch.ones(SPEC["n"])
    w[[2, 7]] = 0.0
    loss = ifunc.output_loss(
        lambda p, b: ifunc.call(model, p, b[0]),
        lambda out, b: (b[2] * F.cross_entropy(out, b[1], reduction="none")).sum(),
    )
    data = (x, y, w)
    if method == "explicit":
        closure = ifunc.ihvp_explicit(loss, params, data, damping=0.1)
    else:
        closure = ifunc.ihvp_ekfac(loss, params, data, model=model, curvature="ggn", damping=0.1)
    return params, loss, closure, data


@pytest.mark.parametrize("method", ["explicit", "ekfac"])
def test_zero_gradient_examples_score_zero_not_nan(method):
    """A training example (or query) with zero gradient has self term 0: its normalised scores are exactly 0."""
    params, loss, closure, data = _weighted(method)
    x, y, w = data
    query = (x[:3], y[:3], torch.tensor([1.0, 0.0, 1.0]))  # query 1 has zero gradient
    raw = ifunc.attribute(loss, params, closure, data, query, progress=False)
    for how in ("cosine", "relatif"):
        s = ifunc.attribute(loss, params, closure, data, query, normalize=how, chunk_size=4, progress=False)
        assert bool(torch.isfinite(s).all())
        assert bool((s[:, [2, 7]] == 0).all()) and bool((s[1] == 0).all())
        others = torch.ones_like(s, dtype=torch.bool)
        others[:, [2, 7]], others[1] = False, False
        assert bool((s[others] != 0).all() and (raw[others] != 0).all())
    assert float(ifunc.self_influence(loss, params, closure, data)[[2, 7]].abs().max()) == 0.0


# ---------------------------------------------------------------- sinks: stores and top-k


def _explicit_problem():
    problem = make_problem(**SPEC)
    closure = ifunc.ihvp_explicit(problem.loss, problem.params, problem.data, damping=0.1)
    return problem, closure, _query(METHODS[0])


def test_a_store_keeps_the_normalised_scores_resumes_them_and_refuses_another_normalisation(tmp_path):
    problem, closure, query = _explicit_problem()
    args = (problem.loss, problem.params, closure, problem.data, query)
    want = ifunc.attribute(*args, normalize="relatif", progress=False)
    path = tmp_path / "s.h5"
    real, calls = store.ScoreWriter.write, []

    def crash_after_two(self, index, columns, fp):
        if len(self.done) == 2:
            raise KeyboardInterrupt
        calls.append(index)
        real(self, index, columns, fp)

    with pytest.MonkeyPatch.context() as patch, pytest.raises(KeyboardInterrupt):
        patch.setattr(store.ScoreWriter, "write", crash_after_two)
        ifunc.attribute(*args, normalize="relatif", out=path, chunk_size=3, progress=False)
    assert calls == [0, 1]
    for other, shown in (("cosine", "'cosine'"), (None, r"nothing \(not recorded: the default\)")):
        with pytest.raises(ValueError, match=f"normalize: file has 'relatif', this call has {shown}"):
            ifunc.attribute(*args, normalize=other, out=path, chunk_size=3, progress=False)
    assert ifunc.attribute(*args, normalize="relatif", out=path, chunk_size=3, progress=False) == path
    got = torch.from_numpy(ifunc.load_scores(path)).double()
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)  # stored in float32
    with pytest.raises(ValueError, match=r"normalize: file has nothing \(not recorded: .*\), this call has 'cosine'"):
        raw = tmp_path / "raw.h5"
        ifunc.attribute(*args, out=raw, chunk_size=3, progress=False)
        ifunc.attribute(*args, normalize="cosine", out=raw, chunk_size=3, progress=False)


def test_top_k_sinks_rank_the_normalised_scores():
    """TopK / HelpfulHarmful of normalised scores are the first columns of the stably sorted normalised matrix, and
    cosine and RelatIF pick the same examples per query (a positive factor per row)."""
    problem, closure, query = _explicit_problem()
    args = (problem.loss, problem.params, closure, problem.data, query)
    full = {how: ifunc.attribute(*args, normalize=how, progress=False) for how in (None, "cosine", "relatif")}
    picked = {}
    for how in ("cosine", "relatif"):
        best = ifunc.attribute(*args, normalize=how, sink=ifunc.TopK(4), chunk_size=3, progress=False)
        order = torch.sort(full[how], dim=1, descending=True, stable=True)
        torch.testing.assert_close(best.values, order.values[:, :4], rtol=1e-12, atol=0)
        assert torch.equal(best.indices, order.indices[:, :4])
        ends = ifunc.attribute(*args, normalize=how, sink=ifunc.HelpfulHarmful(2), chunk_size=4, progress=False)
        assert torch.equal(ends.harmful.indices, torch.sort(full[how], dim=1, stable=True).indices[:, :2])
        picked[how] = best.indices
    assert torch.equal(picked["cosine"], picked["relatif"])
    raw_best = full[None].topk(4, dim=1).indices
    assert not torch.equal(raw_best, picked["cosine"])  # on this problem the norms do change the ranking


# ---------------------------------------------------------------- a gradient index


def _index(tmp_path, problem: Problem):
    return ifunc.build_index(problem.loss, problem.params, problem.data, tmp_path / "i.h5", progress=False)


def test_relatif_from_an_index_with_its_own_curvature(tmp_path):
    """With ``ihvp_projected(index)``: the rows' scores divided by √(their self-influence from the index)."""
    problem, _, query = _explicit_problem()
    index = _index(tmp_path, problem)
    closure = ifunc.ihvp_projected(index, damping=0.1)
    args = (problem.loss, problem.params, closure, index)
    raw = ifunc.attribute(*args, query, progress=False)
    self_terms = ifunc.self_influence(*args, progress=False)
    got = ifunc.attribute(*args, query, normalize="relatif", progress=False)
    _close(got, raw / self_terms.sqrt(), 1e-12)


def test_cosine_from_an_index_with_its_own_curvature(tmp_path):
    problem, _, query = _explicit_problem()
    index = _index(tmp_path, problem)
    closure = ifunc.ihvp_projected(index, damping=0.1)
    Q = ifunc.per_sample_grads(problem.loss, problem.params, query)
    P = ifunc.index.project_flat(index.projection, Q, problem.params)  # the projected raw queries [q, dim]
    t_q = (P * closure(P)).sum(dim=1)
    args = (problem.loss, problem.params, closure, index)
    raw = ifunc.attribute(*args, query, progress=False)
    t_i = ifunc.self_influence(*args, progress=False)
    got = ifunc.attribute(*args, query, normalize="cosine", progress=False)
    _close(got, raw / (t_q[:, None] * t_i[None, :]).sqrt(), 1e-6)


def test_an_index_with_a_parameter_space_closure_cannot_normalise(tmp_path):
    problem, closure, query = _explicit_problem()
    index = _index(tmp_path, problem)
    for how in ("cosine", "relatif"):
        with pytest.raises(NotImplementedError, match=r"normalize=.* ifunc\.ihvp_projected\(index\), or pass the "):
            ifunc.attribute(problem.loss, problem.params, closure, index, query, normalize=how, progress=False)


# ---------------------------------------------------------------- bad values


@pytest.mark.parametrize("bad,kind", [("cos", ValueError), ("Cosine", ValueError), (True, TypeError), (1, TypeError)])
def test_an_unknown_normalisation_is_named(bad, kind):
    problem, closure, query = _explicit_problem()
    with pytest.raises(kind, match=r"normalize.*'cosine'.*'relatif'"):
        ifunc.attribute(problem.loss, problem.params, closure, problem.data, query, normalize=bad)


def test_a_negative_self_term_is_refused_by_example():
    """A closure that is not positive definite (here ``v -> -v``) has no norms: the first negative term is named."""
    problem, _, query = _explicit_problem()
    args = (problem.loss, problem.params, lambda V: -V, problem.data, query)
    with pytest.raises(ValueError, match=r"normalize='relatif': the self term .* of training example 0 is -"):
        ifunc.attribute(*args, normalize="relatif")
    with pytest.raises(ValueError, match=r"normalize='cosine': the self term .* of query 0 is -.* use the GGN"):
        ifunc.attribute(*args, normalize="cosine")


# ---------------------------------------------------------------- the note on per-example solves


def _cost_notes(fn, *args, **kwargs) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fn(*args, **kwargs)
    return [str(w.message) for w in caught if issubclass(w.category, ifunc.CostWarning)]


@pytest.mark.parametrize("name", ["cg", "lissa", "ekfac", "explicit"])
def test_one_cost_note_for_a_solve_per_training_example(name):
    """CG and LiSSA: one ifunc.CostWarning per call naming n and the fast ways; EK-FAC and explicit: none."""
    method = next(m for m in METHODS if m.name == name)
    problem, query = method.problem(SPEC), _query(method)
    closure = _closure(method, problem)
    args = (problem.loss, problem.params, closure, problem.data)
    calls = [
        (ifunc.self_influence, args, {"chunk_size": 3}),
        (ifunc.attribute, (*args, query), {"normalize": "relatif", "chunk_size": 3}),
    ]
    for fn, a, kw in calls:
        notes = _cost_notes(fn, *a, progress=False, **kw)
        if name in ("ekfac", "explicit"):
            assert notes == []
            continue
        assert len(notes) == 1
        assert f"runs {SPEC['n']} iterative solves" in notes[0] and f"this {name} closure" in notes[0]
        assert "ifunc.ihvp_ekfac(loss, params, data, model=model)" in notes[0] and "ihvp_projected" in notes[0]
    assert _cost_notes(ifunc.attribute, *args, query, progress=False) == []  # raw scores: no per-example solve


# ---------------------------------------------------------------- torchrun: two gloo ranks, this file the worker

#: what the worker computes: (method row, normalisation)
RUNS = [("explicit", "cosine"), ("cg", "relatif"), ("ekfac", "cosine"), ("ekfac", "relatif")]


def _scores_everywhere(out: Path) -> dict[str, Any]:
    """Every entry of RUNS with chunk_size 3 (4 chunks: 2 per rank), a per-rank store and a TopK; ifunc.CostWarnings;
    self-influence (explicit: each chunk on its owner now, its solve being local)."""
    results: dict[str, Any] = {}
    for name, how in RUNS:
        method = next(m for m in METHODS if m.name == name)
        problem, query = method.problem(SPEC), _query(method)
        closure = _closure(method, problem)
        args = (problem.loss, problem.params, closure, problem.data, query)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            results[f"{name} {how}"] = ifunc.attribute(*args, normalize=how, chunk_size=3, progress=False)
        results[f"{name} {how} notes"] = sum(issubclass(w.category, ifunc.CostWarning) for w in caught)
        best = _quiet(ifunc.attribute, *args, normalize=how, sink=ifunc.TopK(3), chunk_size=3, progress=False)
        results[f"{name} {how} top"] = best.indices
        path = out / f"{name}-{how}.h5"
        _quiet(ifunc.attribute, *args, normalize=how, out=path, chunk_size=3, progress=False)
        if distributed.world()[0] == 0:
            results[f"{name} {how} stored"] = torch.from_numpy(ifunc.load_scores(path)).double()
        results[f"{name} self"] = _quiet(ifunc.self_influence, *args[:4], chunk_size=3, progress=False)
    return results


@pytest.mark.slow
def test_under_torchrun_each_rank_normalises_its_chunks_and_the_result_is_one_process(tmp_path):
    """Explicit (local solve: the owner computes its chunks' terms), CG (collective: a terms pass first) and EK-FAC
    (the owner's capture): in memory, in per-rank stores merged by rank 0, and through TopK."""
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--rdzv-backend=c10d",
        "--rdzv-endpoint=localhost:0", "--max-restarts=0", "--module", "tests.test_normalize", str(tmp_path),
    ]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    run = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    (tmp_path / "one").mkdir()
    want = _scores_everywhere(tmp_path / "one")  # the one-process reference, while the ranks run
    stdout, stderr = run.communicate(timeout=300)
    assert run.returncode == 0, stderr[-3000:]
    for rank in (0, 1):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        for key, value in want.items():
            if key.endswith("stored") and rank == 1:
                continue
            if isinstance(value, int):  # the note: once, on rank 0 only
                assert got[key] == (value if rank == 0 else 0), key
            elif key.endswith("top"):
                assert torch.equal(got[key], value), key
            else:
                torch.testing.assert_close(got[key], value, rtol=1e-6 if "stored" in key else 1e-9, atol=0)
    assert json.loads(stdout.splitlines()[-1]) == {"ranks": 2}


if __name__ == "__main__":  # a torchrun rank: python -m torch.distributed.run ... --module tests.test_normalize DIR
    import torch.distributed as dist

    torch.set_default_dtype(torch.float64)
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    folder = Path(sys.argv[1])
    torch.save(_scores_everywhere(folder), folder / f"rank{dist.get_rank()}.pt")
    if dist.get_rank() == 0:
        print(json.dumps({"ranks": dist.get_world_size()}))
    dist.destroy_process_group()
