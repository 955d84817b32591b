"""KroneckerFactors' repr shows per-layer shapes, never tensor values."""

import ifunc
from ifunc.testing import mlp_problem


def test_factors_repr_shows_shapes():
    model, params, loss, data = mlp_problem(sizes=(3, 5, 4, 2))
    f = ifunc.fit_kronecker_factors(loss, params, data, model=model, modules=["0", "2"], exclude=["4.bias"])
    text = repr(f)
    assert text == (
        "KroneckerFactors(curvature='ggn', n=12, layers={'0': 'A [4, 4], S [5, 5], diag [5, 4], ekfac [5, 4]', "
        "'2': 'A [6, 6], S [4, 4], diag [4, 6], ekfac [4, 6]'}, fallback={'4.weight': '[2, 4]'}, "
        "excluded=('4.bias',), eigen_dtype='float64')"
    )
    assert "tensor" not in text and str(f) == text
    ident = ifunc.ihvp_ekfac(loss, params, f, model=model, damping=0.1)  # the factors still work as a tuple
    assert ident.info["blocks"]["4.bias"] == ("excluded", None)
