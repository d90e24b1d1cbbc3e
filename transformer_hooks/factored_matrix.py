"""FactoredMatrix: a low-rank matrix kept as the product A @ B, with TransformerLens's API.

An attention head's circuits are products of two thin matrices. The OV circuit,
``model.OV[layer, head] = W_V @ W_O``, is d_model x d_model but has rank at most
d_head; the QK circuit, ``model.QK[layer, head] = W_Q @ W_K.T``, likewise. Keeping
the two factors instead of the d_model x d_model product saves memory and makes the
interesting quantities cheap: the singular values come from SVDs of the factors and
of a d_head x d_head middle matrix, the eigenvalues from the d_head x d_head matrix
B @ A, and the Frobenius norm from the singular values.

A is [..., ldim, mdim] and B is [..., mdim, rdim]; the leading dims broadcast, so
one FactoredMatrix can hold every head of every layer ([n_layers, n_heads, ...]).
Indexing acts on the leading dims first (``OV[layer, head]``); an index into the
last two dims selects rows of A and columns of B without forming the product.

Differences from ``transformer_lens.FactoredMatrix``: shape mismatches raise
ValueError where TransformerLens asserts, 16-bit factors are decomposed in float32,
and the SVD is cached on the instance rather than in an lru_cache that keeps every
instance alive.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from jaxtyping import Complex, Float

from .utils import BroadcastError, CheckError

Scalar = int | float | torch.Tensor


def _for_linalg(x: torch.Tensor) -> torch.Tensor:
    """torch's SVD and eig have no 16-bit kernels, so decompose those in float32."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _keep_dim(index: Any) -> Any:
    """An int index into a matrix dim as a length-1 slice, so the dim is kept."""
    return slice(index, index + 1 or None) if isinstance(index, int) else index


def _axes_used(index: Any) -> int:
    """How many dims of the indexed tensor one entry of an index consumes."""
    if index is None:
        return 0
    if isinstance(index, torch.Tensor) and index.dtype == torch.bool:
        return index.ndim
    return 1


def _tensor_like(x: Any) -> bool:
    """A tensor, or an object that multiplies like one (``shape``, ``ndim`` and ``@``, e.g. a
    wrapper of a tensor): ``@`` with it is delegated to its own ``__matmul__`` /
    ``__rmatmul__``, as TransformerLens does."""
    return isinstance(x, torch.Tensor) or all(hasattr(x, a) for a in ("shape", "ndim", "__matmul__", "__rmatmul__"))


class FactoredMatrix:
    """The matrix A @ B, stored as its factors A [..., ldim, mdim] and B [..., mdim, rdim]."""

    def __init__(self, A: Float[torch.Tensor, "... ldim mdim"], B: Float[torch.Tensor, "... mdim rdim"]):
        if A.ndim < 2 or B.ndim < 2:
            raise CheckError(f"FactoredMatrix factors must be at least 2-D, got A {tuple(A.shape)}, B {tuple(B.shape)}")
        if A.shape[-1] != B.shape[-2]:
            raise CheckError(
                f"FactoredMatrix factors must match on the inner dimension: A {tuple(A.shape)} "
                f"has {A.shape[-1]} columns, B {tuple(B.shape)} has {B.shape[-2]} rows"
            )
        try:
            leading = torch.broadcast_shapes(A.shape[:-2], B.shape[:-2])
        except RuntimeError as error:
            raise BroadcastError(
                f"FactoredMatrix leading dims mismatch (they do not broadcast): A {tuple(A.shape)}, B {tuple(B.shape)}"
            ) from error
        self.ldim = A.shape[-2]
        self.mdim = A.shape[-1]
        self.rdim = B.shape[-1]
        self.has_leading_dims = A.ndim > 2 or B.ndim > 2
        self.shape = leading + (self.ldim, self.rdim)
        self.A = A.broadcast_to(leading + (self.ldim, self.mdim))
        self.B = B.broadcast_to(leading + (self.mdim, self.rdim))
        self._svd: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def __repr__(self) -> str:
        return f"FactoredMatrix: Shape({self.shape}), Hidden Dim({self.mdim})"

    @property
    def ndim(self) -> int:
        """The number of dimensions (leading ones included)."""
        return len(self.shape)

    @property
    def pair(self) -> tuple[Float[torch.Tensor, "*leading ldim mdim"], Float[torch.Tensor, "*leading mdim rdim"]]:
        """The factors ``(A, B)``."""
        return self.A, self.B

    # Products ----------------------------------------------------------------------
    @property
    def AB(self) -> Float[torch.Tensor, "*leading ldim rdim"]:
        """The full product: ldim x rdim per leading index, so it can be large."""
        return self.A @ self.B

    @property
    def BA(self) -> Float[torch.Tensor, "*leading mdim mdim"]:
        """The small reverse product B @ A; only defined when the matrix is square."""
        if self.ldim != self.rdim:
            raise CheckError(f"BA needs a square matrix (ldim == rdim), but the shape is {tuple(self.shape)}")
        return self.B @ self.A

    @property
    def T(self) -> FactoredMatrix:
        """The transpose, still factored: ``B.T @ A.T``."""
        return FactoredMatrix(self.B.transpose(-2, -1), self.A.transpose(-2, -1))

    def __matmul__(self, other: torch.Tensor | FactoredMatrix) -> torch.Tensor | FactoredMatrix:
        """self @ vector is a tensor; self @ matrix stays factored with hidden dim
        min(mdim, rdim): the matrix is folded into B when that keeps the rank low,
        otherwise the product AB becomes the left factor."""
        if isinstance(other, FactoredMatrix):
            return (self @ other.A) @ other.B
        if not _tensor_like(other):
            return NotImplemented
        inner = other.shape[0] if other.ndim == 1 else other.shape[-2]
        if inner != self.rdim:
            raise CheckError(
                f"Cannot multiply FactoredMatrix of shape {tuple(self.shape)} by a tensor of "
                f"shape {tuple(other.shape)}: {self.rdim} != {inner}"
            )
        if other.ndim == 1:
            return (self.A @ (self.B @ other.unsqueeze(-1))).squeeze(-1)
        if self.rdim > self.mdim:
            return FactoredMatrix(self.A, self.B @ other)
        return FactoredMatrix(self.AB, other)

    def __rmatmul__(self, other: torch.Tensor) -> torch.Tensor | FactoredMatrix:
        """vector @ self is a tensor; matrix @ self stays factored with hidden dim min(ldim, mdim)."""
        if not _tensor_like(other):
            return NotImplemented
        if other.shape[-1] != self.ldim:
            raise CheckError(
                f"Cannot multiply a tensor of shape {tuple(other.shape)} by FactoredMatrix of "
                f"shape {tuple(self.shape)}: {other.shape[-1]} != {self.ldim}"
            )
        if other.ndim == 1:
            return ((other.unsqueeze(-2) @ self.A) @ self.B).squeeze(-2)
        if self.ldim > self.mdim:
            return FactoredMatrix(other @ self.A, self.B)
        return FactoredMatrix(other, self.AB)

    def __mul__(self, scalar: Scalar) -> FactoredMatrix:
        """Multiply by a scalar, which scales A."""
        if isinstance(scalar, torch.Tensor) and scalar.numel() != 1:
            raise CheckError(
                f"FactoredMatrix * needs a scalar, got a tensor of shape {tuple(scalar.shape)}; "
                f"use @ for matrix multiplication"
            )
        return FactoredMatrix(self.A * scalar, self.B)

    def __rmul__(self, scalar: Scalar) -> FactoredMatrix:
        return self * scalar

    # Spectrum ----------------------------------------------------------------------
    def svd(
        self,
    ) -> tuple[
        Float[torch.Tensor, "*leading ldim rank"],
        Float[torch.Tensor, "*leading rank"],
        Float[torch.Tensor, "*leading rdim rank"],
    ]:
        """Thin SVD (U, S, V) with AB == U @ diag(S) @ V.mT and rank = min(ldim, mdim, rdim).

        As in TransformerLens the third factor is V, not V transposed, although it is
        also exposed as ``Vh``. Computed from the SVDs of A and B and of the small
        middle matrix between them, and cached.
        """
        if self._svd is None:
            Ua, Sa, Vha = torch.linalg.svd(_for_linalg(self.A), full_matrices=False)
            Ub, Sb, Vhb = torch.linalg.svd(_for_linalg(self.B), full_matrices=False)
            middle = (Sa[..., :, None] * Vha) @ (Ub * Sb[..., None, :])
            Um, S, Vhm = torch.linalg.svd(middle, full_matrices=False)
            self._svd = (Ua @ Um, S, (Vhm @ Vhb).mT)
        return self._svd

    @property
    def U(self) -> Float[torch.Tensor, "*leading ldim rank"]:
        """The left singular vectors of ``svd()`` [..., ldim, rank]."""
        return self.svd()[0]

    @property
    def S(self) -> Float[torch.Tensor, "*leading rank"]:
        """The singular values of ``svd()`` [..., rank]."""
        return self.svd()[1]

    @property
    def V(self) -> Float[torch.Tensor, "*leading rdim rank"]:
        """The right singular vectors of ``svd()`` [..., rdim, rank] (not transposed, as TransformerLens)."""
        return self.svd()[2]

    @property
    def Vh(self) -> Float[torch.Tensor, "*leading rdim rank"]:
        """TransformerLens's deprecated name for V (it is not transposed): warns, as there."""
        warnings.warn(
            "FactoredMatrix.Vh is V (the right singular vectors), not V transposed: use .V "
            "(TransformerLens deprecates .Vh)",
            DeprecationWarning,
            stacklevel=2,
        )
        return self.svd()[2]

    @property
    def eigenvalues(self) -> Complex[torch.Tensor, "*leading mdim"]:
        """Eigenvalues of the small BA. They are AB's nonzero eigenvalues (if BAv = kv,
        then AB(Av) = k(Av)), padded with zeros when mdim > ldim."""
        return torch.linalg.eigvals(_for_linalg(self.BA))

    def norm(self) -> Float[torch.Tensor, "*leading"]:
        """Frobenius norm: the root of the sum of squared singular values."""
        return self.S.pow(2).sum(-1).sqrt()

    # Reshaping ---------------------------------------------------------------------
    def __getitem__(self, index: Any) -> FactoredMatrix:
        """Index the leading dims, then optionally the rows (of A) and columns (of B).

        An int on a row or column keeps that dim with length 1, so the result is
        still a FactoredMatrix; the product is never formed.
        """
        index = index if isinstance(index, tuple) else (index,)
        n_ellipses = sum(entry is Ellipsis for entry in index)
        if n_ellipses > 1:
            raise IndexError("an index can only have a single ellipsis ('...')")
        used = sum(_axes_used(entry) for entry in index if entry is not Ellipsis)
        if used > self.ndim:
            raise CheckError(f"{index} is too long an index for a FactoredMatrix with shape {tuple(self.shape)}")
        fill = (slice(None),) * (self.ndim - used)
        if n_ellipses:
            at = next(i for i, entry in enumerate(index) if entry is Ellipsis)
            index = index[:at] + fill + index[at + 1 :]
        else:
            index = index + fill
        if any(_axes_used(entry) != 1 for entry in index[-2:]):
            raise IndexError(f"{index}: the row and column dims of a FactoredMatrix take one index each")
        leading, row, col = index[:-2], _keep_dim(index[-2]), _keep_dim(index[-1])
        return FactoredMatrix(self.A[leading + (row, slice(None))], self.B[leading + (slice(None), col)])

    def unsqueeze(self, k: int) -> FactoredMatrix:
        """Insert a leading dim of size 1 at position k."""
        return FactoredMatrix(self.A.unsqueeze(k), self.B.unsqueeze(k))

    def get_corner(self, k: int = 3) -> Float[torch.Tensor, "..."]:
        """The first k entries along every dim of AB, computed without forming AB."""
        corner = self.A[..., :k, :] @ self.B[..., :, :k]
        return corner[tuple(slice(k) for _ in range(corner.ndim))]

    def make_even(self) -> FactoredMatrix:
        """The same matrix as (U sqrt(S)) @ (sqrt(S) V.T): both factors carry half the spectrum."""
        root = self.S.sqrt()
        return FactoredMatrix(self.U * root[..., None, :], root[..., :, None] * self.V.mT)

    def collapse_l(self) -> Float[torch.Tensor, "*leading rank rdim"]:
        """Drop the orthogonal left factor U: returns diag(S) @ V.T."""
        return self.S[..., :, None] * self.V.mT

    def collapse_r(self) -> Float[torch.Tensor, "*leading ldim rank"]:
        """Drop the orthogonal right factor V: returns U @ diag(S)."""
        return self.U * self.S[..., None, :]
