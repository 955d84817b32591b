"""Kronecker factors of the layer curvature blocks: K-FAC covariances, eigenbases, EK-FAC eigenvalues.

Normalisation (per example, consistent with ifunc's mean-loss ``H``): for a layer applied at ``T``
positions per example (tokens, conv patches, repeated calls), with inputs ``a_{i,t}`` (a 1 appended for
a tracked bias) and output-gradients ``g_{i,t}`` over ``n`` examples,

* ``A = (1/(nT)) Σ_{i,t} a_{i,t} a_{i,t}ᵀ``     (mean over examples and positions; for an ``nn.Embedding``, whose
  inputs are one-hot, the diagonal: token frequencies ``[vocab]``)
* ``S = (1/n) Σ_{i,t} g_{i,t} g_{i,t}ᵀ``        (sum over positions, mean over examples)
* ``Λ = (1/n) Σ_i (Q_Sᵀ DW_i Q_A)²`` with ``DW_i = Σ_t g_{i,t} a_{i,t}ᵀ`` (EK-FAC, per example)
* ``D = (1/n) Σ_i DW_i²``                        (the diagonal, per example; fitted when ``diagonal=True``)

so ``A ⊗ S`` (K-FAC, the "expand" approximation) and ``Λ`` (EK-FAC) both approximate the per-example
(per-sequence) average ``(1/n) Σ_i vec(DW_i) vec(DW_i)ᵀ``: they are damped at the same scale.
For ``T = 1`` Λ is one matrix product, ``(g̃²)ᵀ (ã²)`` with ``g̃ = g Q_S``, ``ã = a Q_A``; for ``T > 1``
``Q_Sᵀ DW_i Q_A = (G_i Q_S)ᵀ (A_i Q_A)``, never a per-example gradient of the full model.

``g`` depends on ``curvature``: ``"empirical_fisher"`` uses the data labels (gradients of the loss
itself); ``"fisher"`` uses labels sampled from the model (a likelihood of :mod:`ifunc.likelihood`,
``sample(outputs, generator) -> ∂ℓ/∂outputs`` at a sampled label; ``"categorical"`` and ``"gaussian"`` built in);
``"ggn"`` uses the exact output Hessian ``Λ_out = ∇²_out ℓ`` via its square root (``C`` backward passes
for ``C`` outputs per position: exact, but costly for large vocabularies).

This module accumulates the statistics over the data (the passes); the eigendecompositions of ``A`` and ``S``
between the two passes are :mod:`ifunc.ihvp.kronecker.eigenbases`.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import cast

import torch

from ... import distributed
from ..._batches import batch_size
from ..._chunks import Chunk, iter_chunks, n_chunks
from ..._data import DataSource
from ..._errors import check_count
from ..._memory import release_free_memory
from ..._progress import progress_bar
from ..._types import Data, LossFn, Params
from ...grads import batch_grads, check_summed
from ...likelihood import default_generator
from .._operator import check_same_data, rank_partition
from .._scorer import solve_dtype
from .budget import capture_chunk_size, check_chunk_size
from .capture import UseCheck, layer_capture, probe_layers, requiring_grad
from .cotangents import CURVATURES, draws, resolve
from .eigenbases import layer_eigenbases
from .factors import KroneckerFactors, dtype_name
from .layers import dict_parameter_names, find_layers, kind_of

__all__ = ["fit_kronecker_factors", "fit_checked", "split_excluded", "CURVATURES"]


def _add(st: dict, key: str, product: torch.Tensor, weight: float, dtype: torch.dtype) -> None:
    """``st[key] += weight · product`` in ``dtype``, in place (no ``dtype`` copy of the chunk's product)."""
    total = st[key]
    if isinstance(total, torch.Tensor):
        total.add_(product, alpha=weight)
    else:  # the first chunk: the running sum is still the number 0
        st[key] = product.to(dtype) * weight


def split_excluded(params, exclude) -> tuple[list[str], tuple[str, ...], dict]:
    """``(names, excluded names, kept params)``; ``exclude`` holds parameter names or module prefixes."""
    names = dict_parameter_names(params)
    excl = tuple(p for p in names if any(p == e or p.startswith(e + ".") for e in exclude))
    unknown = [e for e in exclude if not any(p == e or p.startswith(e + ".") for p in names)]
    if unknown:
        raise ValueError(f"exclude: {unknown} match no parameter; parameters are {names}")
    return names, excl, {k: v for k, v in params.items() if k not in excl}


def fit_kronecker_factors(
    loss: LossFn, params: Params, data: Data, *, model: torch.nn.Module, **options
) -> KroneckerFactors:
    """Fit K-FAC covariances, their eigenbases, the diagonal and (optionally) the EK-FAC eigenvalues.

    One pass over ``data`` accumulates ``A``, ``S``, ``D`` and the diagonal of every parameter that no
    supported layer covers; the eigendecompositions run in ``eigen_dtype``; a second pass (``ekfac=True``)
    accumulates ``Λ`` in the eigenbases (same sampled labels as the first pass). Normalisation: see the
    module docstring (per-example averaging for K-FAC and EK-FAC alike). Under ``torchrun`` (a default
    process group) the chunks are split across the ranks and the sums all-reduced, and each layer's
    eigendecompositions run on one rank and are shared: every rank ends with the same factors.

    Args:
      loss: ``loss(params, batch) -> scalar`` summed over the batch, calling ``model`` via
        :func:`ifunc.call`; an :func:`ifunc.output_loss` for ``curvature="ggn"``/``"fisher"``.
      params: dict from :func:`ifunc.params_of`.
      data: batch, list of batches, Dataset or DataLoader.
      model: the module the loss calls (hooks are attached to it and removed afterwards).
      modules: module names or predicate ``(name, module) -> bool`` choosing the Kronecker layers
        (default every supported layer).
      exclude: parameter or module names to leave out (their block is zero: they get no influence).
      curvature: ``"ggn"`` (default for an ``output_loss``), ``"fisher"`` (default when ``sample`` is
        given) or ``"empirical_fisher"`` (default otherwise).
      sample: for ``"fisher"``: ``"categorical"``, ``"gaussian"`` or ``sample(outputs, generator) ->
        ∂ℓ/∂outputs`` at labels sampled from the model.
      n_samples: sampled labels per example (``"fisher"``).
      generator: ``torch.Generator`` for the sampling (default: a fresh one seeded 0; the global RNG is
        never used).
      ekfac: also fit the EK-FAC eigenvalues (second pass).
      fallback: give uncovered parameters a diagonal block; ``False`` raises naming them.
      chunk_size: examples per forward/backward; default from ``max_memory``.
      max_memory: byte budget of one chunk (``None``: the default budget: half the available memory, and at most
        1 GiB of per-example tensors): the chunk is the budget over three times what one more example adds to the
        captured forward, measured, within the one chunk cap (:mod:`ifunc.ihvp.kronecker.budget`).
      diagonal: also fit ``D = E[DW²]`` of every layer (needed by :func:`ifunc.ihvp_diagonal`; for sequences
        it costs as much as ``Λ``, so :func:`ifunc.ihvp_ekfac` and :func:`ifunc.ihvp_kfac` fit without it).
      eigen_dtype: dtype of the eigendecompositions, of the sums of ``D`` and ``Λ`` and of the returned eigenvalues,
        ``D`` and ``Λ``; ``None`` (default): the params' precision, at least float32 (float32 for float32, bfloat16
        and float16 models, float64 for float64 ones). ``torch.float64`` for a float32 model decomposes in float64
        anyway (2-4x slower on large factors; on the benchmarked language models the scores of float32 bases rank
        the training data as float64's do, closer than two label samples of the Fisher agree: docs/benchmarks.md,
        "How precise the eigenbases must be"). The choice is ``factors.eigen_dtype`` and is saved
        with the factors. The covariances ``A, S`` are summed over chunks in the params' dtype, at least float32,
        like each chunk's product (for GPT-2 small's MLP layers the sums are 0.96 GB in float32, 1.9 GB in
        float64), and decomposed one layer at a time (factors of 1,024 rows or more on all threads, smaller ones
        on one; layers with bit-identical input covariances share one decomposition). The returned covariances and
        eigenbases ``Q_A, Q_S`` are in the params' dtype, at least float32, where the closures use them. A
        half-precision model (``torch.bfloat16``, ``torch.float16``) computes its activations and gradients in its
        own dtype; they are cast to float32 before any product, so ``A``, ``S``, ``D``, ``Λ`` and the bases are
        float32 or wider.
      keep_covariances: return ``A`` and ``S`` too; ``False`` keeps only their eigendecompositions (all any closure
        uses) and frees each layer's covariances once decomposed (:func:`ifunc.ihvp_ekfac` and friends fitting
        from data pass ``False``: for GPT-2 small's MLP layers ``A, S`` are 0.96 GB in float32).
      progress: tqdm bars over the data passes and the per-layer eigendecompositions (``None``: only on
        a terminal; ``False``: never).

    Returns:
      :class:`KroneckerFactors`.

    Raises:
      ValueError / TypeError: unknown curvature, a loss without outputs for ``"ggn"``/``"fisher"``,
        non-finite factors, uncovered parameters with ``fallback=False``, an ``eigen_dtype`` other than float32 or
        float64.
      ExampleDimError / WeightUseError / ExampleMixError (``ValueError``): a tracked layer whose input has no
        dimension of the examples, whose weight is also used outside its calls (tied, functional, a custom
        ``forward``), or whose input rows are not the examples in order and apart (a model that sorts or mixes the
        batch); see :func:`~ifunc.ihvp.kronecker.capture.probe_layers`, run on the first two examples before the
        passes (and, for a layer without a gradient there, on the first chunk where it has one).

    Example:
      >>> factors = ifunc.fit_kronecker_factors(loss, params, loader, model=model, sample="categorical",
      ...                                       generator=torch.Generator().manual_seed(0))
      >>> ekfac = ifunc.ihvp_ekfac(loss, params, factors, model=model)          # no refit
      >>> kfac = ifunc.ihvp_kfac(loss, params, factors, model=model, damping=1e-3)

    References:
      Martens & Grosse (2015); George et al. (2018); Eschenhagen et al. (2023) for the "expand"
      normalisation of weight-shared (token / patch) layers.
    """
    return fit_checked(loss, params, data, model=model, **options)[0]


def fit_checked(
    loss: LossFn,
    params: Params,
    data: Data,
    *,
    model: torch.nn.Module,
    modules=None,
    exclude=(),
    curvature: str | None = None,
    sample=None,
    n_samples: int = 1,
    generator: torch.Generator | None = None,
    ekfac: bool = True,
    fallback: bool = True,
    chunk_size: int | None = None,
    max_memory: int | None = None,
    diagonal: bool = True,
    eigen_dtype: torch.dtype | None = None,
    keep_covariances: bool = True,
    progress: bool | None = None,
) -> tuple[KroneckerFactors, UseCheck]:
    """The fit: ``(factors, check)``, what :func:`fit_kronecker_factors` returns (its arguments, documented there) and
    what it checked of ``loss``'s use of the layers (:class:`~.capture.UseCheck`, kept by the closure built from the
    fit)."""
    chunk_size = check_chunk_size(chunk_size)
    if eigen_dtype not in (None, torch.float32, torch.float64):
        raise TypeError(
            f"eigen_dtype must be torch.float64, torch.float32 or None (the default: the params' precision, at "
            f"least float32), got {eigen_dtype!r}: the eigendecompositions and the Λ sums need at least float32 (a "
            "bfloat16 / float16 model's factors are fitted in float32 anyway; leave eigen_dtype at its default)"
        )
    n_samples = check_count(n_samples, "n_samples", "fit_kronecker_factors")
    names, excl, kept = split_excluded(params, exclude)
    if not kept:
        raise ValueError("exclude removed every parameter")
    layers, uncovered = find_layers(model, kept, modules=modules)
    if uncovered and not fallback:
        raise ValueError(
            f"parameters {uncovered} belong to no supported layer (nn.Linear, nn.Conv2d, Conv1D, nn.Embedding named "
            "in modules=); pass "
            "fallback=True for diagonal blocks, or exclude=[...] them"
        )
    dtype = next(iter(params.values())).dtype
    device = next(iter(params.values())).device
    eigen_dtype = solve_dtype(dtype) if eigen_dtype is None else eigen_dtype  # the params' precision, >= float32
    gen = generator if generator is not None else default_generator(device)
    start_state = gen.get_state()
    curvature, sample = resolve(loss, curvature, sample)  # checks an explicit choice; None: decided on the outputs
    source = DataSource(data, name="data", ordered=curvature == "fisher")
    check_same_data(source, params)  # every rank: all the data, the same params (no-op without a process group)
    check_summed(loss, params, source)
    check = probe_layers(loss, params, model, layers, source.head(2))  # example dims, weight uses, rows = examples
    layers = check.layers
    if curvature is None:  # the default depends on the outputs' shape (one or several positions per example)
        curvature, sample = resolve(loss, curvature, sample, probe=(params, source.first()))
        if curvature == "fisher":  # sampled labels follow the chunks: the data must keep its order
            source = DataSource(data, name="data", ordered=True)
    assert curvature is not None  # resolve decides the default once it has seen the outputs
    # running sums: the number 0 until the first chunk adds a tensor (distributed.reduce_sum takes both)
    acc: dict[str, dict[str, torch.Tensor | float]] = {s.name: {"A": 0.0, "S": 0.0, "D": 0.0, "L": 0.0} for s in layers}
    fb = {k: torch.zeros_like(params[k], dtype=eigen_dtype) for k in uncovered}
    cov_dtype = torch.promote_types(dtype, torch.float32)  # of the A, S sums: as the products, never below float32
    n = 0
    if chunk_size is None:
        width = max(cov_dtype.itemsize, eigen_dtype.itemsize)
        held = sum(
            width * (kind_of(s).input_factor_numel(s.columns) + s.out_features**2 + 2 * s.columns * s.out_features)
            for s in layers
        )
        chunk_size = capture_chunk_size(
            loss, params, model, layers, source, max_memory=max_memory, what="Kronecker factors", fixed=held
        )

    part = rank_partition()  # the whole data without a process group
    # sampled labels are drawn per chunk: their chunks are not narrowed to keep every rank busy
    step = part.width(source.cheap_count(), chunk_size) if curvature != "fisher" else chunk_size

    def one_pass(rotations):
        nonlocal n
        # progress_bar returns an iterable when given one (only a manual bar may be silent, non-iterable)
        chunks = cast(
            "Iterable[Chunk]",
            progress_bar(
                iter_chunks(source, step, partition=part, skip_others=curvature != "fisher"),
                total=n_chunks(source, step),
                desc="ifunc factors" if rotations is None else "ifunc EK-FAC eigenvalues",
                progress=progress,
            ),
        )
        for _, _, batch, mine in chunks:  # with sampled labels every rank reads every chunk, else only its own
            if not mine:  # another rank's chunk; its labels are still drawn, to keep the generator in step
                if curvature == "fisher":
                    with torch.no_grad():
                        draws(loss, params, batch, curvature, sample, n_samples, gen)
                continue
            p = requiring_grad(params)
            with layer_capture(model, layers, examples=batch_size(batch)) as rec, torch.enable_grad():
                root, directions = draws(loss, p, batch, curvature, sample, n_samples, gen)
            rec.check()
            acts = {s.name: rec.activations(s) for s in layers}
            for j, (u, w) in enumerate(directions):
                wrt = check.wrt(p) if rotations is None and j == 0 else {}  # layers not yet seen with a gradient
                gs = rec.output_grads(root, u, retain_graph=j < len(directions) - 1, wrt=wrt) if layers else {}
                if wrt:
                    check.observe(loss, params, model, batch, rec, {s.name: (acts[s.name], gs[s.name]) for s in layers})
                for s in layers:  # a half-precision model's a, g cast to float32 first: every product and sum too
                    kind = kind_of(s)
                    a, g, st = kind.cast(acts[s.name], cov_dtype), gs[s.name].to(cov_dtype), acc[s.name]
                    if rotations is None:  # chunk products in cov_dtype, D sums in eigen_dtype
                        gf = g.reshape(-1, g.shape[-1])
                        _add(st, "S", gf.T @ gf, w, cov_dtype)
                        if diagonal:
                            _add(st, "D", kind.sq_sum(g, a, None, None, s.columns), w, eigen_dtype)
                    else:
                        Q_S, Q_A = rotations[s.name]
                        _add(st, "L", kind.sq_sum(g, a, Q_S, Q_A, s.columns), w, eigen_dtype)
                if rotations is None and uncovered:
                    func = loss if u is None else loss.outputs
                    for k, v in batch_grads(func, params, batch, cotangent=u, wrt=uncovered).items():
                        fb[k] += w * v.to(cov_dtype).square().sum(0).to(eigen_dtype)
            if rotations is None:
                n += int(next(iter(acts.values())).shape[0]) if acts else batch_size(batch)
                for s in layers:
                    a = kind_of(s).cast(acts[s.name], cov_dtype)
                    _add(acc[s.name], "A", kind_of(s).input_moment(a, s.columns), 1.0 / a.shape[1], cov_dtype)

    one_pass(None)
    release_free_memory()  # the pass's chunks are freed: hand their heap pages back before the factors grow
    distributed.reduce_stats(acc, "ASD" if diagonal else "AS", fb)  # sums over ranks (no-op without a process group)
    n = distributed.reduce_count(n)
    owners = [part.owner(i) for i in range(len(layers))]  # layer l's eigendecompositions: the partition's owner of l
    factors = layer_eigenbases(
        acc,
        layers,
        n,
        owners,
        diagonal=diagonal,
        dtype=cov_dtype,  # the bases of a half-precision model in float32: orthogonal to float32's rounding
        eigen_dtype=eigen_dtype,
        keep_covariances=keep_covariances,
        progress=progress,
    )
    release_free_memory()
    if ekfac and layers:
        gen.set_state(start_state)
        one_pass({s.name: (factors[s.name].Q_S, factors[s.name].Q_A) for s in layers})
        distributed.reduce_stats(acc, "L")
        for s in layers:  # the sums become the means in place
            total = acc[s.name]["L"]
            assert isinstance(total, torch.Tensor)  # every layer added a chunk (the data is not empty)
            factors[s.name] = factors[s.name]._replace(ekfac=total.div_(n))
        release_free_memory()
    diagonals = {k: v / n for k, v in fb.items()}  # of the parameters no layer covers
    out = KroneckerFactors(tuple(check.layers), factors, diagonals, excl, n, curvature, dtype_name(eigen_dtype))
    return out, check
