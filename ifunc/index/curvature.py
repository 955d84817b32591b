"""Curvature in the projected space of a gradient index: the index's own second moment, inverted block by block.

A gradient index holds ``r_i = P ∇ℓ(z_i)`` for every training example. Its coordinates fall into blocks ``b``: each
Kronecker layer's ``k_o·k_a``, then the ``k_dense`` of the other parameters. The curvature of :func:`ihvp_projected`
is the block-diagonal second moment of the rows (LoGra's projected empirical Fisher):

``F̃_b = (1/n) Σ_i r_{i,b} r_{i,b}ᵀ``  (``[m_b, m_b]``, ``m_b = k_o·k_a`` or ``k_dense``),

that is ``P_b F_b P_bᵀ`` with ``F_b`` the empirical Fisher (gradient second moment) of the parameters of block
``b``: where the projection is the identity it *is* that block. Each block is eigendecomposed once, ``F̃_b = U_b
diag(w_b) U_bᵀ``, and the closure applies ``(F̃_b + λ_b I)^{-1} v_b = U_b [(U_bᵀ v_b) / (w_b + λ_b)]`` to each block
``v_b`` of a projected vector.

A query then needs no parameter-space solve: its raw gradient is projected, ``q̃ = (F̃ + λI)^{-1} P ∇f(z_q)``, and
scored against the rows, ``scores[q, i] = q̃ᵀ r_i``; self-influence is ``s_i = r_iᵀ (F̃ + λI)^{-1} r_i``. Both are
done by :class:`~ifunc.index.query.IndexScorer` with the closure's :class:`ProjectedScorer`; with ordinary training
data the closure has no meaning (its coordinates are the index's) and is refused.
"""

from __future__ import annotations

import torch

from .. import distributed
from ..functional import structure
from ..ihvp import IHVP, GenericScorer, ScoreOptions, block_damping, check_conditioning, solve_dtype
from .build import query_projector
from .handle import GradientIndex, projection_digest
from .projection import Projection

__all__ = ["ProjectedIHVP", "ProjectedScorer", "ihvp_projected", "projected_blocks", "DENSE_BLOCK", "MAX_BLOCK"]

#: most coordinates of one block: its float64 ``[m, m]`` moment, eigenvectors and workspace (~1.5 GiB at 8,192)
MAX_BLOCK = 8192

#: the name of the dense parameters' block (never a module's qualified name: it has a space)
DENSE_BLOCK = "dense parameters"


def projected_blocks(projection: Projection) -> list[tuple[str, slice]]:
    """``[(block name, slice of the projected coordinates)]``: each layer's ``k_o·k_a``, then the dense ``k_dense``."""
    out, start = [], 0
    for L in projection.layers:
        out.append((L.name, slice(start, start + L.k_o * L.k_a)))
        start += L.k_o * L.k_a
    if projection.k_dense:
        out.append((DENSE_BLOCK, slice(start, start + projection.k_dense)))
    return out


def _second_moments(index: GradientIndex, blocks: list[tuple[str, slice]]) -> list[torch.Tensor]:
    """``[Σ_i r_{i,b} r_{i,b}ᵀ]`` (float64, unnormalised) over the index's rows, one stored chunk in memory at a time.

    Under ``torchrun`` rank ``r`` adds the chunks ``j ≡ r (mod W)`` and the partial sums are all-reduced.
    """
    rank, size = distributed.world()
    sums = [torch.zeros(s.stop - s.start, s.stop - s.start, dtype=torch.float64) for _, s in blocks]
    for j, (_, rows) in enumerate(index.chunks()):
        if j % size != rank:
            continue
        rows = rows.to(torch.float64)
        for acc, (_, s) in zip(sums, blocks):
            acc.addmm_(rows[:, s].T, rows[:, s])
    return distributed.reduce_sum(sums, names=[f"second moment of block {name!r}" for name, _ in blocks])


class ProjectedIHVP(IHVP):
    """The closure of :func:`ihvp_projected`: ``v [dim] -> (F̃ + λI)^{-1} v`` in an index's projected coordinates.

    Besides being an :class:`~ifunc.ihvp.IHVP` (with ``dim`` the index's ``dim``), it holds ``projection`` (the
    index's), ``digest`` (its SHA-256, :func:`~ifunc.index.handle.projection_digest`), ``params`` (the
    fingerprint of the parameters the index was built at) and ``blocks`` (``(name, slice)`` per block): an index
    with another projection or other parameters is refused; one of other data in the same projection and at the
    same parameters is scored with this curvature. ``damping`` is one λ, or the mapping block name -> λ
    when ``damping=None`` chose one per block.
    """

    FIELDS = ("projection", "digest", "params", "blocks", "model", "queries")
    projection: Projection
    digest: str
    params: str
    model: torch.nn.Module | None
    blocks: tuple[tuple[str, slice], ...]
    #: with ``model``: what projecting queries through its layers keeps between calls (the checked capture, its probe
    #: of each callable, the drawn matrices; :func:`~ifunc.index.build.query_projector`), shared by ``with_damping``
    queries: dict

    def describe(self) -> dict:
        """:meth:`IHVP.describe` with ``"damping"`` the λ of every block, ``{block name: λ}``."""
        return {**super().describe(), "damping": {k: float(v) for k, v in self.info["damping"].items()}}

    def scorer(self, loss, params, options: ScoreOptions) -> ProjectedScorer:
        """The scorer of an index's projected space (:class:`ProjectedScorer`): usable only with that index."""
        return ProjectedScorer(self, loss, params, options)

    def __repr__(self) -> str:
        lam = "per-block" if isinstance(self.damping, dict) else f"{self.damping:g}"
        return f"IHVP({self.name}, dim={self.dim}, damping={lam})"


def _refuse_data() -> TypeError:
    return TypeError(
        "ihvp_projected's closure works in the projected coordinates of a gradient index, not in parameter space: "
        "pass that index (ifunc.open_index(path)) as the training data, or use a parameter-space closure "
        "(ifunc.ihvp_ekfac, ihvp_cg, ...) with these training examples"
    )


class ProjectedScorer:
    """The scorer of a :class:`ProjectedIHVP`: raw query gradients, then the closure in the projected space.

    It scores only through :class:`~ifunc.index.query.IndexScorer` (an index as the training data), which takes
    ``raw`` (a generic scorer whose "preconditioned" queries are the raw gradients ``∇f(z_q) [q, d]``),
    :meth:`precondition` and :meth:`self_quadratic`; used directly (ordinary training data) every method of the
    scorer protocol raises ``TypeError``.
    """

    splits_examples = False

    def __init__(self, closure: ProjectedIHVP, loss, params, options: ScoreOptions):
        if options.per_module or options.per_token or options.query_rank is not None:
            raise NotImplementedError(
                "ihvp_projected scores whole queries from a gradient index: drop per_module, per_token, query_rank="
            )
        self.closure, self.dtype = closure, options.dtype
        self.params_dtype = solve_dtype(structure(params).dtypes[0])  # of the self terms (half params: float32)
        self.raw = GenericScorer(lambda V: V, None, loss, params, options._replace(dtype=None))
        #: with the closure's model: ``(batch, offset) -> [dim, b]``, the queries projected as the rows were built
        self.project_queries = None
        if closure.model is not None:
            func = options.measurement or loss
            self.project_queries = query_projector(
                func, params, closure.projection, closure.model, cache=closure.queries
            )

    def check_index(self, index: GradientIndex) -> None:
        """ValueError unless ``index`` has the projection the closure was fitted in (by digest) and its parameters."""
        found = projection_digest(index.projection)
        if found != self.closure.digest:
            raise ValueError(
                f"ihvp_projected: the closure was fitted in the projected space of another gradient index "
                f"(projection sha256 {self.closure.digest[:12]}…, {index.path} has {found[:12]}…): fit it from this "
                "index, ifunc.ihvp_projected(index)"
            )
        if index.meta.get("params") != self.closure.params:
            raise ValueError(
                f"ihvp_projected: the closure was fitted from an index built at other parameters (fingerprint "
                f"{self.closure.params}, {index.path} has {index.meta.get('params')}): fit it from this index, "
                "ifunc.ihvp_projected(index)"
            )

    def precondition(self, V: torch.Tensor) -> torch.Tensor:
        """``[q, dim] -> (F̃ + λI)^{-1} V [q, dim]`` in ``dtype=`` of the scores (default: ``V``'s)."""
        out = self.closure(V.to(self.closure.device)).to(V.device)
        return out.to(self.dtype or out.dtype)

    def self_quadratic(self, rows: torch.Tensor) -> torch.Tensor:
        """``[b, dim] -> [1, b]``: ``r_iᵀ (F̃ + λI)^{-1} r_i`` in the closure's dtype, returned in the parameters' (at
        least float32)."""
        R = rows.to(self.closure.device, self.closure.dtype)
        with torch.no_grad():
            return (R * self.closure.solve(R)).sum(dim=1)[None].to(rows.device, self.params_dtype)

    def prepare(self, query, chunk_size):
        raise _refuse_data()

    def preconditioned(self) -> torch.Tensor:
        raise _refuse_data()

    def chunk_size(self, train, *, pairs: bool) -> int:
        raise _refuse_data()

    def chunk(self, batch, offset: int) -> torch.Tensor:
        raise _refuse_data()

    def self_terms(self, batch, offset: int) -> torch.Tensor:
        raise _refuse_data()


def ihvp_projected(
    index: GradientIndex, *, model: torch.nn.Module | None = None, damping=None, dtype: torch.dtype = torch.float64
) -> ProjectedIHVP:
    """The damped inverse of the index's block-diagonal projected empirical Fisher, ``v -> (F̃ + λI)^{-1} v``.

    ``F̃ = blockdiag_b F̃_b``, ``F̃_b = (1/n) Σ_i r_{i,b} r_{i,b}ᵀ`` over the ``n`` rows ``r_i [dim]`` of ``index``,
    with one block per Kronecker layer of its projection (``k_o·k_a`` coordinates) and one for the dense parameters
    (``k_dense``); see :mod:`ifunc.index.curvature`. The rows are read chunk by chunk (one stored chunk in memory)
    and summed in float64; each block is eigendecomposed once, in float64. Under ``torchrun`` every rank reads the
    index, adds its chunks (``j ≡ r mod W``), and the sums are all-reduced: every rank holds the same closure.

    Use it as the curvature of the index's own coordinates: ``ifunc.attribute(loss, params, ihvp_projected(index),
    index, query)`` projects the raw query gradients and applies this closure (no parameter-space solve), and
    ``ifunc.self_influence(loss, params, ihvp_projected(index), index)`` returns ``r_iᵀ (F̃ + λI)^{-1} r_i``.

    Args:
      index: a finished gradient index (:func:`ifunc.build_index` / :func:`ifunc.open_index`).
      model: the model the index was built with (``build_index(..., model=model)``): queries are then projected
        as the rows were, from each layer's captured inputs and output gradients, instead of from the full
        per-example gradient of every parameter (``vmap(grad)``, ``d`` numbers per query): the same scores up to
        rounding, many times faster on a large model. A model without the index's layers is refused. The first
        query with a loss or measurement also checks how it uses the layers (passes of one and two examples, as
        every Kronecker closure does); the closure keeps that, so later queries with it skip the check.
      damping: λ added to every block; ``None``: per block ``λ_b = 0.1 × mean eigenvalue of F̃_b`` (the rule of the
        Kronecker family). ``with_damping(λ)`` re-damps every block with one λ without refitting.
      dtype: the dtype the closure solves in (its eigenvectors are kept in it; inputs are cast to it and back):
        float32 or float64, whatever the model's dtype.

    Returns:
      A :class:`ProjectedIHVP` (``dim = index.dim``) taking ``[dim]``, ``[k, dim]``; ``info`` holds ``n``, the
      blocks, the λ of each (``"damping"``) and each block's eigenvalues (``"eigenvalues {block}"``).

    Raises:
      TypeError: ``index`` is not a :class:`~ifunc.index.GradientIndex`; damping not a number; ``dtype`` not a
        floating-point dtype, or a half-precision one (``torch.bfloat16``, ``torch.float16``).
      ValueError: an empty index; a block of more than ``MAX_BLOCK`` (8,192) coordinates; a negative damping;
        ``damping=None`` on a block with no curvature; a block whose damped curvature is not positive definite
        (e.g. ``damping=0`` with fewer examples than coordinates).

    Example:
      >>> index = ifunc.open_index("train.idx.h5")
      >>> ihvp = ifunc.ihvp_projected(index)
      >>> scores = ifunc.attribute(loss, params, ihvp, index, query)
      >>> surprise = ifunc.self_influence(loss, params, ihvp, index)
    """
    if not isinstance(index, GradientIndex):
        raise TypeError(
            f"ihvp_projected fits the curvature from a gradient index (ifunc.build_index / ifunc.open_index), got "
            f"{type(index).__name__}; for training data use a parameter-space method such as ifunc.ihvp_ekfac"
        )
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"ihvp_projected: dtype must be a floating-point torch.dtype (torch.float64), got {dtype!r}")
    if dtype.itemsize < 4:
        raise TypeError(
            f"ihvp_projected: dtype={dtype} would solve in half precision, where λ vanishes beside the eigenvalues "
            "(1 + 1e-3 is 1 in bfloat16); solve in torch.float32 or torch.float64 (the default), and ask attribute("
            "..., dtype=torch.bfloat16) for a half-precision score contraction"
        )
    if index.n == 0:
        raise ValueError(f"ihvp_projected: {index.path} holds no examples, so there is no curvature to fit")
    blocks = projected_blocks(index.projection)
    for name, s in blocks:
        m = s.stop - s.start
        if m > MAX_BLOCK:
            raise ValueError(
                f"ihvp_projected: the block {name!r} has {m} projected coordinates; its [{m}, {m}] second moment and "
                f"eigendecomposition would need about {3 * 8 * m * m / 2**30:.1f} GiB (at most {MAX_BLOCK} "
                "coordinates per block). Build the index with a smaller layer_size / dense_size, or query it with a "
                "parameter-space closure (ifunc.ihvp_ekfac, ...)"
            )
    eig, eigen = [], []  # float64 eigenvalues (the damping rule), and the pairs in the solve's dtype
    for (name, _), total in zip(blocks, _second_moments(index, blocks)):
        w, U = torch.linalg.eigh(total / index.n)
        eig.append((name, w))
        eigen.append((w.to(dtype), U.to(dtype)))
    like = torch.zeros((), dtype=dtype)
    unflatten = structure(torch.zeros(index.dim, dtype=dtype))
    held = tuple(blocks)
    digest = projection_digest(index.projection)
    queries: dict = {}

    def rebuild(lam) -> ProjectedIHVP:
        what = [f"the projected block of {'the ' + n if n == DENSE_BLOCK else f'layer {n!r}'}" for n, _ in held]
        lams = [block_damping(w, lam, wh, who="ihvp_projected") for (_, w), wh in zip(eig, what)]
        for (_, w), lam_b, wh in zip(eig, lams, what):
            check_conditioning(w, lam_b, dtype, who="ihvp_projected", what=wh)

        def solve(V: torch.Tensor) -> torch.Tensor:
            out = torch.empty_like(V)
            for (_, s), (w, U), lam_b in zip(held, eigen, lams):
                out[:, s] = ((V[:, s] @ U) / (w + lam_b)) @ U.T
            return out

        per_block = {n: lam_b for (n, _), lam_b in zip(held, lams)}
        info = {
            "n": index.n,
            "projection_sha256": digest,
            "blocks": {n: [s.start, s.stop] for n, s in held},
            "damping": per_block,
            **{f"eigenvalues {n}": w for n, w in eig},
        }
        return ProjectedIHVP.make(
            solve,
            name="projected",
            damping=per_block if lam is None else lams[0],  # a given λ, checked, is the same in every block
            unflatten=unflatten,
            like=like,
            rebuild=rebuild,
            info=info,
            projection=index.projection,
            digest=digest,
            params=index.meta.get("params"),
            blocks=held,
            model=model,
            queries=queries,
        )

    return rebuild(damping)
