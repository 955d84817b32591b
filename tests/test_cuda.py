"""Device-correct code: every method of the table, and the scores, on a CUDA device.

Skipped without a GPU. Every tensor and generator ifunc creates must live on the parameters' device, so the
closure of every row runs on CUDA and agrees with the same closure on the CPU; ``attribute`` (generic and
Kronecker) and a sampled-label Fisher fit run there too.
"""

import pytest
import torch
from torch import nn

import ifunc
from tests.methods import METHODS, Problem

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")

SPEC = {"seed": 0, "sizes": (3, 4, 2), "n": 8, "activation": nn.Tanh, "task": "classification"}


def _on(problem: Problem, device: str) -> Problem:
    problem.model.to(device)
    params = {k: v.to(device) for k, v in problem.params.items()}
    return Problem(problem.model, params, problem.loss, tuple(t.to(device) for t in problem.data))


@pytest.mark.parametrize("method", METHODS, ids=str)
def test_every_method_runs_on_cuda_and_agrees_with_the_cpu(method):
    problem = method.problem(SPEC)
    V = torch.randn(3, sum(v.numel() for v in problem.params.values()), generator=torch.Generator().manual_seed(1))
    on_cpu = method.build(problem, 0.5)(V)
    gpu = _on(problem, "cuda")
    ihvp = method.build(gpu, 0.5)
    out = ihvp(V.cuda())
    assert out.device.type == "cuda" and ihvp.device.type == "cuda"
    torch.testing.assert_close(out.cpu(), on_cpu, rtol=1e-6, atol=1e-8)
    scores = ifunc.attribute(gpu.loss, gpu.params, ihvp, gpu.data, gpu.data)
    assert scores.device.type == "cuda" and bool(torch.isfinite(scores).all())


def test_sampled_fisher_fit_and_curvature_on_cuda():
    problem = _on(METHODS[0].problem(SPEC), "cuda")
    gen = torch.Generator(device="cuda").manual_seed(0)
    factors = ifunc.fit_kronecker_factors(
        problem.loss, problem.params, problem.data, model=problem.model, sample="categorical", generator=gen
    )
    assert all(f.A.device.type == "cuda" for f in factors.factors.values())
    loss = ifunc.output_loss(problem.loss.outputs, problem.loss.loss_on_outputs, likelihood="categorical")
    op = ifunc.curvature_operator(loss, problem.params, problem.data, curvature="fisher")
    assert op.matvec(torch.ones(2, op.flat_params.numel(), device="cuda")).device.type == "cuda"
