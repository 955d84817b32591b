"""Seeded random projections of gradients that preserve inner products in expectation (pure tensors, no I/O).

A :class:`Projection` maps a parameter-space vector (a per-example gradient, a preconditioned query) to ``dim``
numbers, defined by a seed and sizes only:

- a tracked layer (weight matrix ``[out, in]``, plus a bias column when its bias is tracked: ``in_eff = in + 1``)
  gets two Gaussian matrices ``P_o [k_o, out]``, ``P_a [k_a, in_eff]`` with i.i.d. entries ``N(0, 1/k_o)``,
  ``N(0, 1/k_a)``; a matrix ``X`` maps to ``P_o X P_aᵀ [k_o, k_a]``. Since ``E[P_oᵀP_o] = I`` and
  ``E[P_aᵀP_a] = I`` (independent), ``E⟨P_o X P_aᵀ, P_o Y P_aᵀ⟩ = ⟨X, Y⟩``. A size at its cap (``k_o = out``) uses
  the identity instead, which is exact;
- every other parameter (all of them without a model) shares one sign hash ``S [k_dense, d_rest]`` (a
  CountSketch): coordinate ``i`` is added, with a fair random sign ``σ_i``, to one uniformly random row ``h_i``.
  ``E⟨Sx, Sy⟩ = ⟨x, y⟩`` and ``Var⟨Sx, Sy⟩ = (‖x‖²‖y‖² + ⟨x, y⟩² − 2Σ_i x_i²y_i²) / k_dense``, never more than a
  dense Gaussian ``N(0, 1/k_dense)`` matrix's ``(‖x‖²‖y‖² + ⟨x, y⟩²) / k_dense``, at ``O(d_rest)`` per vector
  instead of ``O(k_dense·d_rest)`` (identity when ``k_dense = d_rest``).

Rows of the result (the index's row order): the layers in order, each ``k_o·k_a`` row-major over ``(k_o, k_a)``,
then the ``k_dense`` dense rows. Draws come from CPU generators seeded by ``sha256(f"{seed}/...")`` (never the
global RNG): Gaussian matrices in float64, cast to the input's dtype and device; every result has the input's
dtype. A caller applying one projection many times (a build) draws everything once with :func:`hold_draws`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import torch

from .._types import Params
from ..functional import parameter_names, structure
from ..ihvp.kronecker.layers import KINDS
from ._gaussian import column_blocks, gaussian, sign_hash, sign_hash_codes
from ._spec import DEFAULT_BLOCK, ProjectedLayer, Projection

__all__ = [
    "ProjectedLayer",
    "Projection",
    "make_projection",
    "hold_draws",
    "layer_matrices",
    "project_layer",
    "project_matrix",
    "project_dense",
    "project_captured",
    "project_flat",
    "project_factored",
    "factors_match",
]


def _positive(value, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{what} must be a positive int, got {value!r}")
    return value


def make_projection(
    params: Params,
    specs: Iterable = (),
    *,
    seed: int,
    layer_size: int | tuple[int, int] = 16,
    dense_size: int = 256,
    exclude: Iterable[str] = (),
    block: int = DEFAULT_BLOCK,
) -> Projection:
    """The projection of ``params``: one ``P_o ⊗ P_a`` per layer spec, one ``R`` for every other parameter.

    Args:
      params: the tracked parameters (any pytree; a dict when ``specs`` are given).
      specs: layer specs (:class:`~ifunc.ihvp.kronecker.layers.LayerSpec`, e.g. ``ihvp_identity(params,
        model=model).blocks[i].spec``); each spec's weight and bias belong to its layer, in this order.
      seed: a non-negative int; with the sizes it defines every matrix.
      layer_size: ``(k_o, k_a)``, or ``k`` for ``(k, k)``; capped at ``(out, in_eff)`` per layer.
      dense_size: ``k_dense``, capped at ``d_rest`` (the dense numel); 0 when nothing is dense.
      exclude: parameter names left out of the projection (recorded in ``excluded``).
      block: most codes of the sign hash drawn at once (its blocks, hence the map, depend on it).

    Returns:
      A :class:`Projection` of ``dim = Σ k_o·k_a + k_dense`` rows.

    Raises:
      ValueError: a bad size or seed, a spec or excluded name not in ``params`` (or with the wrong size), a
        parameter claimed twice, or nothing left to project.

    Example:
      >>> ihvp = ifunc.ihvp_identity(params, model=model)          # only for its layer specs
      >>> P = make_projection(params, [b.spec for b in ihvp.blocks], seed=0, layer_size=16, dense_size=256)
      >>> rows = project_flat(P, grads, params)                     # [q, d] -> [q, P.dim]
    """
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"make_projection: seed must be a non-negative int, got {seed!r}")
    sizes = tuple(layer_size) if isinstance(layer_size, (tuple, list)) else (layer_size, layer_size)
    if len(sizes) != 2:
        raise ValueError(f"make_projection: layer_size must be an int k or a pair (k_o, k_a), got {layer_size!r}")
    ko, ka = _positive(sizes[0], "layer_size"), _positive(sizes[1], "layer_size")
    dense_size, block = _positive(dense_size, "dense_size"), _positive(block, "block")
    numel = dict(zip(parameter_names(params), structure(params).sizes))
    claimed: dict[str, str] = {}

    def claim(name: str | None, owner: str, size: int) -> None:
        if name is None:
            return
        if name not in numel:
            raise ValueError(f"make_projection: {owner} names {name!r}, which is not in params")
        if name in claimed:
            raise ValueError(f"make_projection: {name!r} is claimed by {claimed[name]} and by {owner}")
        if numel[name] != size:
            raise ValueError(f"make_projection: {owner} expects {name!r} of {size} entries, params has {numel[name]}")
        claimed[name] = owner

    layers = []
    for s in specs:
        if s.kind not in KINDS:
            raise ValueError(f"make_projection: layer {s.name!r} has unknown kind {s.kind!r} (known: {sorted(KINDS)})")
        if s.kind == "embedding":
            raise NotImplementedError(
                f"make_projection: {s.name!r} is an nn.Embedding, whose captured inputs are token ids, not "
                "features; a gradient index does not project embedding layers yet. Leave it out of modules= (its "
                "weight then goes to the dense sketch) or exclude= it"
            )
        claim(s.weight, f"layer {s.name!r}", s.out_features * s.in_features)
        claim(s.bias, f"layer {s.name!r}", s.out_features)
        L = ProjectedLayer(s.name, s.kind, s.weight, s.bias, s.out_features, s.in_features, 0, 0)
        layers.append(L._replace(k_o=min(ko, L.out_features), k_a=min(ka, L.in_eff)))
    excluded = (exclude,) if isinstance(exclude, str) else tuple(exclude)
    for name in excluded:
        claim(name, "exclude", numel.get(name, -1))
    dense = tuple((n, k) for n, k in numel.items() if n not in claimed)
    if not layers and not dense:
        raise ValueError("make_projection: every parameter is excluded; nothing to project")
    k_dense = min(dense_size, sum(k for _, k in dense))
    return Projection(seed, tuple(layers), dense, k_dense, block, excluded)


def _floating(x, what: str, ndim: int) -> torch.Tensor:
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() != ndim:
        got = f"{x.dtype} {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{what} must be a floating-point tensor with {ndim} dimensions, got {got}")
    return x


Draws = dict  #: what :func:`hold_draws` returns: layer name -> (P_o, P_a), (dense name, block) -> codes


def hold_draws(P: Projection, *, dtype: torch.dtype, device=None, max_bytes: int = 2**28) -> Draws:
    """Every matrix of ``P`` drawn once, for a caller that applies ``P`` many times (pass it as ``held=``).

    Layer ``name`` -> ``(P_o, P_a)`` in ``dtype`` on ``device``; ``(parameter, j)`` -> the sign-hash codes of dense
    block ``j`` (int64, 8 bytes per coordinate), held while their total stays within ``max_bytes`` (the rest are
    drawn per call). The same maps as drawing per call, bit for bit; a local value, dropped with its caller.
    """
    held: Draws = {L.name: layer_matrices(P, L.name, dtype=dtype, device=device) for L in P.layers}
    budget = max_bytes if 0 < P.k_dense < sum(k for _, k in P.dense) else 0
    for name, numel in P.dense:
        for j, (start, stop) in enumerate(column_blocks(numel, P.block)):
            if 8 * (stop - start) > budget:
                return held
            budget -= 8 * (stop - start)
            held[name, j] = sign_hash_codes(stop - start, P.k_dense, P.seed, "dense", name, str(j)).to(device)
    return held


def layer_matrices(
    P: Projection, name: str, *, dtype: torch.dtype = torch.float64, device=None, held: Draws | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(P_o [k_o, out], P_a [k_a, in_eff])`` of layer ``name``: entries ``N(0, 1/k)``, or the identity at the cap.

    Drawn in float64 (seeds ``sha256(f"{seed}/layer/{name}/out")`` and ``.../in``), then cast to ``dtype``; taken
    from ``held`` (:func:`hold_draws`) when it has them in that dtype.
    """
    if held is not None and name in held and held[name][0].dtype == dtype:
        return held[name]
    L = P.layer(name)
    P_o = torch.eye(L.out_features, dtype=torch.float64)
    if L.k_o < L.out_features:
        P_o = gaussian(L.k_o, L.out_features, P.seed, "layer", name, "out")
    P_a = torch.eye(L.in_eff, dtype=torch.float64)
    if L.k_a < L.in_eff:
        P_a = gaussian(L.k_a, L.in_eff, P.seed, "layer", name, "in")
    return P_o.to(dtype=dtype, device=device), P_a.to(dtype=dtype, device=device)


def project_layer(
    P: Projection, name: str, a: torch.Tensor, g: torch.Tensor, *, held: Draws | None = None
) -> torch.Tensor:
    """``Σ_t (P_o g_t)(P_a a_t)ᵀ`` per example, flattened: ``[b, k_o·k_a]``, without forming ``G = Σ_t g_t a_tᵀ``.

    Args:
      a: ``[b, T, in_eff]`` the layer's captured inputs (a column of ones last when the bias is tracked).
      g: ``[b, T, out]`` the gradients of its outputs (same dtype as ``a``).

    Equals ``project_matrix(P, name, einsum("bto,bti->boi", g, a))``; costs ``b·T·(out·k_o + in_eff·k_a + k_o·k_a)``.
    """
    L = P.layer(name)
    a, g = _floating(a, "project_layer: a", 3), _floating(g, "project_layer: g", 3)
    if a.shape[:2] != g.shape[:2] or a.shape[2] != L.in_eff or g.shape[2] != L.out_features or a.dtype != g.dtype:
        raise ValueError(
            f"project_layer {name!r}: expected a [b, T, {L.in_eff}] and g [b, T, {L.out_features}] of one dtype, "
            f"got a {a.dtype} {tuple(a.shape)} and g {g.dtype} {tuple(g.shape)}"
        )
    P_o, P_a = layer_matrices(P, name, dtype=a.dtype, device=a.device, held=held)
    return ((g @ P_o.T).transpose(1, 2) @ (a @ P_a.T)).reshape(a.shape[0], L.k_o * L.k_a)


def project_matrix(P: Projection, name: str, M: torch.Tensor, *, held: Draws | None = None) -> torch.Tensor:
    """``P_o M P_aᵀ`` flattened: ``M [q, out, in_eff]`` (bias last column) -> ``[q, k_o·k_a]``, in ``M``'s dtype."""
    L = P.layer(name)
    M = _floating(M, "project_matrix: M", 3)
    if tuple(M.shape[1:]) != (L.out_features, L.in_eff):
        raise ValueError(f"project_matrix {name!r}: expected M [q, {L.out_features}, {L.in_eff}], got {tuple(M.shape)}")
    P_o, P_a = layer_matrices(P, name, dtype=M.dtype, device=M.device, held=held)
    return (P_o @ M @ P_a.T).reshape(M.shape[0], L.k_o * L.k_a)


def project_dense(P: Projection, columns: Sequence[torch.Tensor], *, held: Draws | None = None) -> torch.Tensor:
    """``X Sᵀ``: the dense parameters' columns ``X = [x_1 | x_2 | …]`` -> ``[b, k_dense]``, ``S`` the sign hash.

    Args:
      columns: one ``[b, numel_p]`` (or ``[b, *shape_p]``) tensor per ``P.dense`` entry, in that order, one dtype.
      held: draws from :func:`hold_draws` (else each block's codes are drawn here).

    Coordinate ``i`` of parameter ``p``'s block ``j`` (blocks of ``P.block`` coordinates) has code ``c_i`` uniform
    on ``[0, 2k)`` from the generator seeded ``sha256(f"{seed}/dense/{p}/{j}")``; it adds ``x_i`` to row
    ``c_i mod k`` with sign ``+`` if ``c_i < k`` else ``−``. ``E⟨S x, S y⟩ = ⟨x, y⟩``; cost one pass over ``X``.
    When ``k_dense = d_rest``, ``S = I`` and the result is the columns side by side.
    """
    if not P.dense:
        raise ValueError("project_dense: this projection has no dense parameters")
    if len(columns) != len(P.dense):
        raise ValueError(f"project_dense: expected {len(P.dense)} column blocks ({P.dense}), got {len(columns)}")
    cols = []
    for (name, numel), x in zip(P.dense, columns):
        if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() < 1 or x.shape[1:].numel() != numel:
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"project_dense: {name!r} needs [b, {numel}] floating-point columns, got {got}")
        cols.append(x.reshape(x.shape[0], numel))
    if len({(x.shape[0], x.dtype, x.device) for x in cols}) > 1:
        raise ValueError("project_dense: the columns differ in rows, dtype or device")
    if P.k_dense == sum(k for _, k in P.dense):
        return torch.cat(cols, dim=1)

    def blocks():  # each block's codes drawn when it is reached, unless held
        for (name, numel), x in zip(P.dense, cols):
            for j, (start, stop) in enumerate(column_blocks(numel, P.block)):
                codes = held.get((name, j)) if held is not None else None
                if codes is None:
                    codes = sign_hash_codes(stop - start, P.k_dense, P.seed, "dense", name, str(j)).to(x.device)
                yield x[:, start:stop], codes

    return sign_hash(blocks(), P.k_dense)


def project_captured(
    P: Projection,
    layers: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
    dense: Mapping[str, torch.Tensor],
    *,
    held: Draws | None = None,
) -> torch.Tensor:
    """``[b, dim]``: every layer's :func:`project_layer` then :func:`project_dense`, in the index's row order.

    Args:
      layers: module -> ``(a [b, T, in_eff], g [b, T, out])`` (what ``ifunc.ihvp.kronecker.score.capture_chunk``
        returns first).
      dense: parameter name -> per-example gradients ``[b, ...]`` (its second result, or per-example gradients).
      held: draws from :func:`hold_draws`, to draw nothing here.
    """
    missing = [L.name for L in P.layers if L.name not in layers] + [n for n, _ in P.dense if n not in dense]
    if missing:
        raise ValueError(f"project_captured: nothing given for {missing}")
    parts = [project_layer(P, L.name, *layers[L.name], held=held) for L in P.layers]
    if P.dense:
        parts.append(project_dense(P, [dense[n] for n, _ in P.dense], held=held))
    return torch.cat(parts, dim=1)


def project_flat(P: Projection, V: torch.Tensor, params: Params, *, held: Draws | None = None) -> torch.Tensor:
    """``[q, d] -> [q, dim]``: flat parameter-space vectors (e.g. preconditioned query gradients) projected.

    Each layer's weight (and bias) slices of ``V`` become ``[q, out, in_eff]`` as the Kronecker blocks read them
    (the kind's ``to_matrix``, bias as the last column), then :func:`project_matrix`; the dense parameters' slices
    go to :func:`project_dense`. Slices follow :func:`ifunc.flatten` order of ``params`` (parameters the
    projection does not know, such as excluded ones, are ignored). For a per-example gradient this equals
    :func:`project_captured` of the same example's captured ``a, g``. ``held``: draws from :func:`hold_draws`.
    """
    V = _floating(V, "project_flat: V", 2)
    sizes = structure(params).sizes
    if V.shape[1] != sum(sizes):
        raise ValueError(f"project_flat: V has {V.shape[1]} columns, params have {sum(sizes)} entries")
    slices, start = {}, 0
    for name, size in zip(parameter_names(params), sizes):
        slices[name], start = slice(start, start + size), start + size

    def part(name: str, numel: int) -> torch.Tensor:
        if name not in slices or slices[name].stop - slices[name].start != numel:
            raise ValueError(f"project_flat: params do not hold {name!r} with {numel} entries, as the projection")
        return V[:, slices[name]]

    q, parts = V.shape[0], []
    for L in P.layers:
        M = KINDS[L.kind].to_matrix(part(L.weight, L.out_features * L.in_features), L.out_features, L.in_features)
        if L.bias is not None:
            M = torch.cat([M, part(L.bias, L.out_features).reshape(q, L.out_features, 1)], dim=2)
        parts.append(project_matrix(P, L.name, M, held=held))
    if P.dense:
        parts.append(project_dense(P, [part(n, k) for n, k in P.dense], held=held))
    return torch.cat(parts, dim=1)


def factors_match(P: Projection, specs: Sequence) -> bool:
    """Whether vectors given per layer of ``specs`` (layer specs) can be projected by :func:`project_factored`.

    True when ``P``'s layers are exactly these (names, weights, biases, kinds) and none of ``P``'s dense parameters is
    a weight or bias of one of them; else the caller projects flat vectors (:func:`project_flat`).
    """
    mine = [(L.name, L.weight, L.bias, L.kind) for L in P.layers]
    theirs = [(s.name, s.weight, s.bias, s.kind) for s in specs]
    owned = {n for s in specs for n in (s.weight, s.bias) if n}
    return sorted(mine, key=str) == sorted(theirs, key=str) and not any(name in owned for name, _ in P.dense)


def project_factored(
    P: Projection, layers: Mapping[str, tuple], dense: Mapping[str, torch.Tensor], *, held: Draws | None = None
) -> torch.Tensor:
    """``[q, dim]``: vectors given per layer as ``left R rightᵀ`` projected through the factors.

    Args:
      layers: module -> ``(spec, left [out, out] or None, R [q, out, in_eff], right [in_eff, in_eff] or None)``
        (a Kronecker closure's preconditioned queries ``Q_S R Q_Aᵀ``, from its scorer's ``factored()``); None is
        the identity. The specs must match ``P``'s layers (:func:`factors_match`).
      dense: parameter name -> ``[q, numel]`` columns of the projection's dense parameters; a name missing is zero.

    Each layer becomes ``(P_o left) R (P_a right)ᵀ`` (``q·k_o·out·in_eff`` instead of ``q·out·in_eff·(out +
    in_eff)`` for forming ``left R rightᵀ`` first), the same map as :func:`project_matrix` of the product up to
    rounding.

    Raises:
      ValueError: the layers do not match ``P``'s.
    """
    if not factors_match(P, [spec for spec, *_ in layers.values()]):
        raise ValueError("project_factored: the layers given are not the projection's; use project_flat")
    parts = []
    for L in P.layers:
        _, left, R, right = layers[L.name]
        P_o, P_a = layer_matrices(P, L.name, dtype=R.dtype, device=R.device, held=held)
        P_o = P_o if left is None else P_o @ left.to(R.dtype)
        P_a = P_a if right is None else P_a @ right.to(R.dtype)
        parts.append((P_o @ R @ P_a.T).reshape(R.shape[0], L.k_o * L.k_a))
    if P.dense:
        like = parts[0] if parts else next(iter(dense.values()))
        cols = [dense[name] if name in dense else like.new_zeros(like.shape[0], numel) for name, numel in P.dense]
        parts.append(project_dense(P, [c.to(like.dtype) for c in cols], held=held))
    return torch.cat(parts, dim=1)
