"""FactoredMatrix against the dense product AB it stands for: products, SVD, eigenvalues,
norm, matmul with tensors and other factored matrices, scaling, indexing, and errors."""

from __future__ import annotations

import pytest
import torch

from transformer_hooks.factored_matrix import FactoredMatrix


def factors(ldim: int, mdim: int, rdim: int, leading: tuple[int, ...] = (), dtype=torch.float32, seed: int = 0):
    torch.manual_seed(seed)
    return torch.randn(*leading, ldim, mdim, dtype=dtype), torch.randn(*leading, mdim, rdim, dtype=dtype)


def random_fm(ldim: int, mdim: int, rdim: int, leading: tuple[int, ...] = (), dtype=torch.float32, seed: int = 0):
    return FactoredMatrix(*factors(ldim, mdim, rdim, leading, dtype, seed))


def sorted_by_abs(values: torch.Tensor) -> torch.Tensor:
    """Largest magnitude first; a conjugate pair (equal magnitude) ordered by imaginary part."""
    values = values[torch.argsort(values.imag, stable=True)]
    return values[torch.argsort(values.abs().round(decimals=8), descending=True, stable=True)]


def close(actual: torch.Tensor, expected: torch.Tensor, atol: float = 1e-4) -> None:
    torch.testing.assert_close(actual, expected, atol=atol, rtol=1e-4)


# Construction and products ----------------------------------------------------------
def test_AB_is_the_product_with_broadcast_leading_dims():
    torch.manual_seed(0)
    A, B = torch.randn(3, 1, 5, 2), torch.randn(4, 2, 6)
    fm = FactoredMatrix(A, B)
    close(fm.AB, A @ B)
    assert fm.AB.shape == (3, 4, 5, 6)


def test_shape_attributes():
    fm = random_fm(5, 2, 6, leading=(3, 4))
    assert (fm.ldim, fm.mdim, fm.rdim) == (5, 2, 6)
    assert fm.shape == (3, 4, 5, 6) and fm.ndim == 4 and fm.has_leading_dims
    assert fm.A.shape == (3, 4, 5, 2) and fm.B.shape == (3, 4, 2, 6)
    plain = random_fm(5, 2, 6)
    assert plain.shape == (5, 6) and plain.ndim == 2 and not plain.has_leading_dims


def test_pair_and_repr():
    A, B = factors(5, 2, 6)
    fm = FactoredMatrix(A, B)
    assert torch.equal(fm.pair[0], A) and torch.equal(fm.pair[1], B)
    assert repr(fm) == "FactoredMatrix: Shape(torch.Size([5, 6])), Hidden Dim(2)"


def test_BA_is_the_reverse_product():
    A, B = factors(5, 3, 5, leading=(2,))
    close(FactoredMatrix(A, B).BA, B @ A)


def test_T_is_the_transpose():
    fm = random_fm(5, 3, 7, leading=(2,))
    assert fm.T.shape == (2, 7, 5)
    close(fm.T.AB, fm.AB.mT)


def test_unsqueeze_adds_a_leading_dim():
    fm = random_fm(5, 3, 7, leading=(2,))
    close(fm.unsqueeze(0).AB, fm.AB.unsqueeze(0))
    close(fm.unsqueeze(1).AB, fm.AB.unsqueeze(1))


# SVD, eigenvalues and norm -------------------------------------------------------------
SVD_SHAPES = [  # ldim, mdim, rdim, leading
    (6, 3, 5, ()),
    (4, 7, 5, ()),  # mdim > ldim
    (5, 3, 5, (2, 3)),
    (3, 8, 6, (2,)),  # mdim > ldim, with leading dims
    (9, 4, 2, (3,)),  # rdim < mdim
]


@pytest.mark.parametrize("ldim,mdim,rdim,leading", SVD_SHAPES)
def test_svd_reconstructs_AB(ldim, mdim, rdim, leading):
    fm = random_fm(ldim, mdim, rdim, leading)
    U, S, Vh = fm.svd()
    rank = min(ldim, mdim, rdim)
    assert U.shape == (*leading, ldim, rank) and S.shape == (*leading, rank) and Vh.shape == (*leading, rdim, rank)
    # As in TransformerLens, Vh is V: AB = U diag(S) V^T.
    close(U @ torch.diag_embed(S) @ Vh.mT, fm.AB)
    eye = torch.eye(rank).expand(*leading, rank, rank)
    close(U.mT @ U, eye)
    close(Vh.mT @ Vh, eye)
    assert fm.U is U and fm.S is S and fm.V is Vh
    with pytest.warns(DeprecationWarning):  # TransformerLens's deprecated alias of V
        assert fm.Vh is Vh


@pytest.mark.parametrize("ldim,mdim,rdim,leading", SVD_SHAPES)
def test_singular_values_are_the_top_ones_of_AB(ldim, mdim, rdim, leading):
    fm = random_fm(ldim, mdim, rdim, leading)
    rank = min(ldim, mdim, rdim)
    close(fm.S, torch.linalg.svdvals(fm.AB)[..., :rank])


@pytest.mark.parametrize("ldim,mdim,rdim,leading", SVD_SHAPES)
def test_norm_is_the_frobenius_norm_of_AB(ldim, mdim, rdim, leading):
    fm = random_fm(ldim, mdim, rdim, leading)
    close(fm.norm(), torch.linalg.norm(fm.AB, dim=(-2, -1)))


def test_svd_is_cached():
    fm = random_fm(6, 3, 5)
    assert fm.svd() is fm.svd()


@pytest.mark.parametrize("leading", [(), (2, 3)])
def test_collapse_and_make_even_keep_the_matrix(leading):
    fm = random_fm(6, 3, 5, leading)
    close(fm.U @ fm.collapse_l(), fm.AB)
    close(fm.collapse_r() @ fm.V.mT, fm.AB)
    even = fm.make_even()
    close(even.AB, fm.AB)
    # Both halves carry sqrt(S): A^T A = B B^T = diag(S).
    close(even.A.mT @ even.A, torch.diag_embed(fm.S))
    close(even.B @ even.B.mT, torch.diag_embed(fm.S))


@pytest.mark.parametrize("leading", [(), (3,)])
def test_eigenvalues_are_the_nonzero_eigenvalues_of_AB(leading):
    fm = random_fm(7, 3, 7, leading, dtype=torch.float64)
    eigenvalues = fm.eigenvalues
    assert eigenvalues.shape == (*leading, 3)
    for mine, dense in zip(eigenvalues.reshape(-1, 3), torch.linalg.eigvals(fm.AB).reshape(-1, 7), strict=True):
        close(sorted_by_abs(mine), sorted_by_abs(dense)[:3])


def test_eigenvalues_with_mdim_above_ldim_are_padded_with_zeros():
    fm = random_fm(3, 6, 3, dtype=torch.float64)
    eigenvalues = sorted_by_abs(fm.eigenvalues)
    close(eigenvalues[:3], sorted_by_abs(torch.linalg.eigvals(fm.AB)))
    close(eigenvalues[3:], torch.zeros(3, dtype=torch.complex128))


def test_bfloat16_is_decomposed_in_float32():
    A, B = factors(6, 3, 6)
    fm = FactoredMatrix(A.bfloat16(), B.bfloat16())
    assert fm.eigenvalues.dtype == torch.complex64
    assert fm.S.dtype == torch.float32
    exact = FactoredMatrix(A.bfloat16().float(), B.bfloat16().float())
    close(fm.S, exact.S)
    # BA itself is multiplied in bfloat16, as in TransformerLens.
    torch.testing.assert_close(sorted_by_abs(fm.eigenvalues), sorted_by_abs(exact.eigenvalues), atol=0, rtol=2e-2)


# Multiplication ----------------------------------------------------------------------
@pytest.mark.parametrize("leading", [(), (2, 3)])
def test_matmul_with_vectors(leading):
    fm = random_fm(5, 3, 7, leading)
    right, left = torch.randn(7), torch.randn(5)
    close(fm @ right, fm.AB @ right)
    close(left @ fm, left @ fm.AB)
    assert (fm @ right).shape == (*leading, 5) and (left @ fm).shape == (*leading, 7)


# The product stays factored through the narrower of mdim and the shared dim.
MATMUL_SHAPES = [  # ldim, mdim, rdim, width of the other matrix's free dim
    (6, 3, 7, 2),  # shared dim wider than mdim: fold the tensor into the factor
    (6, 3, 7, 9),
    (6, 8, 4, 2),  # shared dim narrower than mdim: the product becomes a factor
    (6, 8, 4, 9),
]


@pytest.mark.parametrize("ldim,mdim,rdim,width", MATMUL_SHAPES)
def test_matmul_with_a_matrix_on_the_right(ldim, mdim, rdim, width):
    fm = random_fm(ldim, mdim, rdim, leading=(2,))
    other = torch.randn(rdim, width)
    product = fm @ other
    assert isinstance(product, FactoredMatrix)
    assert product.mdim == min(mdim, rdim)
    close(product.AB, fm.AB @ other)


@pytest.mark.parametrize("ldim,mdim,rdim,width", MATMUL_SHAPES)
def test_matmul_with_a_matrix_on_the_left(ldim, mdim, rdim, width):
    fm = random_fm(rdim, mdim, ldim, leading=(2,))  # shared dim is fm.ldim
    other = torch.randn(width, rdim)
    product = other @ fm
    assert isinstance(product, FactoredMatrix)
    assert product.mdim == min(mdim, rdim)
    close(product.AB, other @ fm.AB)


def test_matmul_broadcasts_a_batched_matrix():
    fm = random_fm(6, 3, 7)
    other = torch.randn(4, 7, 2)
    close((fm @ other).AB, fm.AB @ other)
    close((other.mT @ fm.T).AB, other.mT @ fm.AB.mT)


@pytest.mark.parametrize("mdims", [(3, 2), (2, 5), (8, 8)])
def test_matmul_with_a_factored_matrix(mdims):
    left = random_fm(6, mdims[0], 5, leading=(2,), seed=1)
    right = random_fm(5, mdims[1], 4, seed=2)
    product = left @ right
    assert isinstance(product, FactoredMatrix)
    assert product.mdim == min(mdims[0], 5, mdims[1])
    close(product.AB, left.AB @ right.AB)


@pytest.mark.parametrize("scalar", [2.5, -3, torch.tensor(0.5), torch.tensor([[4.0]])])
def test_scalar_multiplication_scales_A(scalar):
    fm = random_fm(5, 3, 7, leading=(2,))
    for scaled in (fm * scalar, scalar * fm):
        assert isinstance(scaled, FactoredMatrix)
        close(scaled.AB, fm.AB * scalar)
        close(scaled.A, fm.A * scalar)
        assert torch.equal(scaled.B, fm.B)


# Indexing ----------------------------------------------------------------------------
INDICES = [  # an index into the FactoredMatrix, and the same selection on the dense AB
    (1, (1,)),
    ((1, 2), (1, 2)),
    ((slice(None), 2), (slice(None), 2)),
    (torch.tensor([2, 0]), (torch.tensor([2, 0]),)),
    ((None, 1), (None, 1)),
    ((0, 1, 3), (0, 1, slice(3, 4))),  # an int row keeps its dim
    ((0, 1, -1), (0, 1, slice(-1, None))),
    ((0, 1, 3, 4), (0, 1, slice(3, 4), slice(4, 5))),
    ((0, 1, -1, -1), (0, 1, slice(-1, None), slice(-1, None))),
    ((Ellipsis, slice(1, 4), slice(2, 6)), (Ellipsis, slice(1, 4), slice(2, 6))),
    ((Ellipsis, 2), (Ellipsis, slice(2, 3))),
    ((1, Ellipsis, torch.tensor([0, 3]), slice(None)), (1, Ellipsis, torch.tensor([0, 3]), slice(None))),
]


@pytest.mark.parametrize("index,dense_index", INDICES)
def test_indexing_matches_indexing_AB(index, dense_index):
    fm = random_fm(5, 2, 7, leading=(3, 4))
    selected = fm[index]
    assert isinstance(selected, FactoredMatrix) and selected.mdim == fm.mdim
    close(selected.AB, fm.AB[dense_index])


def test_get_corner():
    fm = random_fm(5, 2, 7, leading=(3, 4))
    close(fm.get_corner(2), fm.AB[:2, :2, :2, :2])
    plain = random_fm(5, 2, 7)
    close(plain.get_corner(), plain.AB[:3, :3])


# Errors ------------------------------------------------------------------------------
def test_mismatched_inner_dims_name_both_shapes():
    with pytest.raises(ValueError, match=r"A \(5, 3\).*B \(4, 7\)"):
        FactoredMatrix(torch.randn(5, 3), torch.randn(4, 7))


def test_unbroadcastable_leading_dims_name_both_shapes():
    with pytest.raises(ValueError, match=r"A \(2, 5, 3\).*B \(4, 3, 7\)"):
        FactoredMatrix(torch.randn(2, 5, 3), torch.randn(4, 3, 7))


def test_BA_and_eigenvalues_need_a_square_matrix():
    fm = random_fm(5, 3, 7)
    with pytest.raises(ValueError, match=r"ldim == rdim.*\(5, 7\)"):
        _ = fm.BA
    with pytest.raises(ValueError, match="ldim == rdim"):
        _ = fm.eigenvalues


def test_matmul_with_mismatched_tensors():
    fm = random_fm(5, 3, 7)
    for bad in (
        lambda: fm @ torch.randn(6),
        lambda: fm @ torch.randn(6, 2),
        lambda: torch.randn(6) @ fm,
        lambda: torch.randn(2, 6) @ fm,
    ):
        with pytest.raises(ValueError, match=r"\(5, 7\)"):
            bad()
    with pytest.raises(ValueError, match="scalar"):
        fm * torch.randn(2)


def test_too_long_an_index():
    fm = random_fm(5, 2, 7, leading=(3,))
    with pytest.raises(ValueError, match="too long an index"):
        fm[0, 0, 0, 0]
    with pytest.raises(IndexError):
        fm[..., ...]
