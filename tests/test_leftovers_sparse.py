"""``SAE.encode_sparse`` latents (:class:`mistudio.saes.SparseLatents`) reduce and multiply like the dense latents
they stand for: ``sum``, ``mean``, ``amax``, ``amin`` over a dimension or all, ``max()``/``min()`` of the whole,
and ``z @ w``; ``max(dim)``/``min(dim)`` (which would owe torch's argmax too) raise an ``InputError`` naming what
works instead."""
from __future__ import annotations

import pytest
import torch

from mistudio.errors import InputError
from mistudio.saes import load_sae
from test_latents import D_SAE, make_sae


@pytest.fixture(scope="module", params=["topk", "standard"])
def encoded(request, tmp_path_factory):
    """(sparse latents, their dense form) of 50 random rows through a random SAE."""
    folder = tmp_path_factory.mktemp(request.param)
    make_sae(folder, request.param)
    sae = load_sae(folder)
    x = torch.randn(50, 32, generator=torch.Generator().manual_seed(1))
    z = sae.encode_sparse(x)
    dense = z.to_dense()
    torch.testing.assert_close(dense, sae.encode(x))
    assert (dense == 0).any() and (dense != 0).any()
    return z, dense


CASES = {
    "sum0": lambda z: z.sum(0), "sum1": lambda z: z.sum(dim=1), "sum": lambda z: z.sum(),
    "mean0": lambda z: z.mean(0), "mean1": lambda z: z.mean(1), "mean": lambda z: z.mean(),
    "amax0": lambda z: z.amax(0), "amax1": lambda z: z.amax(1), "amin0": lambda z: z.amin(0),
    "amin1": lambda z: z.amin(dim=1), "max": lambda z: z.max(), "min": lambda z: z.min(),
}


@pytest.mark.parametrize("name", list(CASES))
def test_sparse_latents_reduce_like_the_dense_ones(encoded, name):
    z, dense = encoded
    got, want = CASES[name](z), CASES[name](dense)
    assert got.shape == want.shape and got.dtype == want.dtype
    if name.startswith(("amax", "amin", "max", "min")):
        assert torch.equal(got, want)
    else:
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_negated_latents_have_a_negative_minimum(encoded):
    z, dense = encoded
    negative = type(z)(z.offsets, z.indices, -z.values, z.d_sae, z.width)
    assert torch.equal(negative.amin(0), (-dense).amin(0)) and torch.equal(negative.amax(0), (-dense).amax(0))


def test_sparse_latents_times_a_matrix(encoded):
    z, dense = encoded
    w = torch.randn(D_SAE, 7, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(z @ w, dense @ w, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(z @ w[:, 0], dense @ w[:, 0], rtol=1e-5, atol=1e-5)
    with pytest.raises(InputError, match=rf"{D_SAE}"):
        z @ torch.ones(D_SAE + 1, 3)


@pytest.mark.parametrize("name", ["max", "min"])
def test_max_over_a_dimension_names_amax(encoded, name):
    z, _ = encoded
    with pytest.raises(InputError, match=rf"{name}\(dim\).*a{name}\(dim\).*to_dense\(\)"):
        getattr(z, name)(0)
