"""A LoRA update measured against the base weight it adapts, from its factors and one streaming pass over W.

For ``dW = s B A`` (B (m, r), A (r, n)) and the base weight W (m, n), everything here comes from the thin QR of
B and Aᵀ (``B = Q_b R_b``, ``Aᵀ = Q_a R_a``), the SVD of the r x r core ``s R_b R_aᵀ = U_c Σ V_cᵀ`` and, from
W, only ``M = Q_bᵀ W Q_a`` (r x r), the row norms ``||w_i||²`` and the row products ``x_i = <w_i, dw_i>``. W is
read once in row blocks (:class:`BaseAccumulator`), so the cost is ``O(m n r)`` and the memory one block plus
``O((m + n) r)``: the m x n update is never formed. See ``shared/ANALYSIS.md`` sections 1, 5 and 7 (Hu et al.
2021, LoRA, section 7; Liu et al. 2024, DoRA) for the definitions and the dense checks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from lora_ops.errors import LoraOpsError, ShapeMismatchError
from lora_ops.factors import LoraFactors, check_factors
from lora_ops.rank import _finite
from lora_ops.svd import thin_svd


#: Why a ratio is null: the update is zero (B = 0, an adapter as initialised), or the base weight is zero.
ZERO_UPDATE = "zero_update"
ZERO_BASE = "zero_base"


@dataclass
class BaseAnalysis:
    """One module's update ``dW`` (m, n) against its base weight W (m, n). None marks an undefined ratio; ``reason``
    says why (:data:`ZERO_UPDATE`, :data:`ZERO_BASE`).

    Attributes:
        shape: (m, n) = (d_out, d_in) of the update.
        rank: numerical rank k of dW: ``#{σ_i > max(m, n) ε σ_1}`` (U, V and the projections use the top k).
        sigma: (k,) singular values of dW, descending.
        norm_W, norm_dW: ``||W||_F`` and ``||dW||_F``.
        rel_fro: ``||dW||_F / ||W||_F``.
        cos_W: ``<W, dW>_F / (||W||_F ||dW||_F)``.
        proj_fro: ``||Uᵀ W V||_F`` with U (m, k), V (n, k) the top singular vectors of dW (LoRA paper, 7.3).
        proj_over_W: ``proj_fro / ||W||_F``.
        amplification: ``||dW||_F / proj_fro``.
        random_proj: ``k ||W||_F / sqrt(m n)``, the root of ``E ||Uᵀ W V||_F²`` over Haar-random U, V with k columns.
        alignment_over_random: ``proj_fro / random_proj`` (about 1 for a W that ignores dW's directions).
        dir_alignment: (k,) ``u_iᵀ W v_i``.
        dM: mean over output rows of ``| ||w_i + dw_i|| - ||w_i|| |`` (DoRA adapters: ``| m_i - ||w_i|| |`` with m
            the stored magnitude, the row norm of the effective weight).
        dD: mean over output rows (those with ``w_i`` and ``w_i + dw_i`` non-zero) of ``1 - cos(w_i + dw_i, w_i)``;
            DoRA's rescaling keeps the direction, so it is the same formula for DoRA adapters.
        dora_eff_fro, dora_rel_fro: DoRA adapters only: ``||diag(d)(W + dW) - W||_F`` with
            ``d_i = m_i / ||w_i + dw_i||``, and that over ``||W||_F``.
        base_top: with :meth:`BaseAccumulator.finish` ``top=...``: overlaps with W's top-K singular subspaces.
    """

    shape: tuple[int, int]
    rank: int
    sigma: list[float]
    norm_W: float
    norm_dW: float
    rel_fro: float | None
    cos_W: float | None
    proj_fro: float | None
    proj_over_W: float | None
    amplification: float | None
    random_proj: float | None
    alignment_over_random: float | None
    dir_alignment: list[float]
    dM: float
    dD: float | None
    dora_eff_fro: float | None = None
    dora_rel_fro: float | None = None
    base_top: BaseTopOverlap | None = None
    reason: str | None = None


@dataclass
class BaseTopOverlap:
    """How dW's singular subspaces sit in W's top-K ones (LoRA paper 7.2's φ, against W instead of another update).

    Attributes:
        k: K, the number of W's singular directions used (capped by min(m, n)).
        overlap_out: ``||U_Wᵀ U||_F² / min(K, k)`` in [0, 1]: output side, U_W (m, K) and U (m, k) orthonormal.
        overlap_in: the same on the input side with V_W (n, K) and V (n, k).
        random_out, random_in: the expected overlaps for a random k-dimensional subspace, ``max(K, k) / m`` and
            ``max(K, k) / n``.
        w_top_proj: ``||U_Wᵀ W V_W||_F = sqrt(sum_{i <= min(K, k)} σ_i(W)²)``, the projection of W on its own top
            directions (the paper's "W" column of Table 7).
        spec_rel: ``σ_1(dW) / σ_1(W)``.
        sigma_W: (K,) the top singular values of W.
    """

    k: int
    overlap_out: float | None
    overlap_in: float | None
    random_out: float
    random_in: float
    w_top_proj: float
    spec_rel: float | None
    sigma_W: list[float] = field(default_factory=list)


def random_projection_baseline(norm_W: float, m: int, n: int, k: int) -> float:
    """``sqrt(E ||Uᵀ W V||_F²) = k ||W||_F / sqrt(m n)`` for Haar-random U (m, k), V (n, k) with orthonormal columns.

    Exact: ``E[U Uᵀ] = (k / m) I`` and ``E[V Vᵀ] = (k / n) I``, independent, so ``E tr(U Uᵀ W V Vᵀ Wᵀ) = k² ||W||² /
    (m n)`` (LoRA paper Table 7's "random" column: 4 * 61.95 / 12288 = 0.020 at r = 4).

    Example:
        >>> random_projection_baseline(61.95, 12288, 12288, 4)  # doctest: +ELLIPSIS
        0.0201...
    """
    if m <= 0 or n <= 0:
        raise LoraOpsError(f"bad shape ({m}, {n})")
    return k * norm_W / math.sqrt(m * n)


def numerical_rank(sigma: torch.Tensor, m: int, n: int) -> int:
    """``#{σ_i > max(m, n) ε σ_1}`` with ε of float64 (0 for a zero update); σ (r,) descending."""
    if sigma.numel() == 0 or not float(sigma[0]) > 0:
        return 0
    tol = max(m, n) * torch.finfo(torch.float64).eps * float(sigma[0])
    return int((sigma > tol).sum())


class BaseAccumulator:
    """Streams the base weight W (m, n) in row blocks against one update ``dW = s B A``; gives :class:`BaseAnalysis`.

    Args:
        f: A (r, n), B (m, r), scale s.
        transposed: the blocks are rows of the stored ``Wᵀ`` (n, m) instead of W (GPT-2's Conv1D, embeddings):
            the same numbers come out, about W's output rows.
        dtype: the dtype of the one large product per block (``W_blk @ Q_a``); float32 (default) halves the time
            against float64 with a relative rounding of about 1e-7; everything else is float64.

    Example:
        >>> W = torch.randn(8, 6, dtype=torch.float64); f = LoraFactors(torch.randn(2, 6), torch.randn(8, 2), 0.5)
        >>> acc = BaseAccumulator(f, dtype=torch.float64); acc.add(0, W[:5]); acc.add(5, W[5:])
        >>> r = acc.finish(); dW = 0.5 * f.B.double() @ f.A.double()
        >>> abs(r.rel_fro - float(dW.norm() / W.norm())) < 1e-12
        True
    """

    def __init__(self, f: LoraFactors, *, transposed: bool = False, dtype: torch.dtype = torch.float32) -> None:
        check_factors(f)
        self.m, self.n = f.shape
        self.transposed = transposed
        self.dtype = dtype
        self.scale = float(f.scale)
        self.B = f.B.detach().to(torch.float64)
        self.A = f.A.detach().to(torch.float64)
        self.q_b, self.r_b = torch.linalg.qr(self.B, mode="reduced")
        self.q_a, self.r_a = torch.linalg.qr(self.A.T, mode="reduced")
        core = _finite(self.scale * (self.r_b @ self.r_a.T))  # (r_b, r_a)
        self.core = core
        self.u, self.sigma, self.vh = torch.linalg.svd(core, full_matrices=False)
        self.k = numerical_rank(self.sigma, self.m, self.n)
        self._q_a_w = self.q_a.to(dtype)
        self._q_b_w = self.q_b.to(dtype)
        self._a_t_w = self.A.T.to(dtype) if transposed else None
        self.M = torch.zeros(self.q_b.shape[1], self.q_a.shape[1], dtype=torch.float64)
        self.row2 = torch.zeros(self.m, dtype=torch.float64)
        self.x = torch.zeros(self.m, dtype=torch.float64)
        self._w_at = torch.zeros(self.m, self.A.shape[0], dtype=torch.float64) if transposed else None
        self._seen = 0

    def add(self, start: int, block: torch.Tensor) -> None:
        """Add rows ``start : start + len(block)`` of W (m, n), or of ``Wᵀ`` (n, m) when ``transposed``."""
        rows, cols = self.m, self.n
        if self.transposed:
            rows, cols = cols, rows
        if block.ndim != 2 or block.shape[1] != cols or not 0 <= start <= start + block.shape[0] <= rows:
            raise ShapeMismatchError(
                f"block {tuple(block.shape)} at row {start} does not fit a weight of {rows} x {cols} rows x columns"
            )
        end = start + block.shape[0]
        blk = block.to(self.dtype)
        norms = torch.linalg.vector_norm(blk, dim=0 if self.transposed else 1, dtype=torch.float64)
        if not self.transposed:
            p = (blk @ self._q_a_w).to(torch.float64)  # W[blk] Q_a (b, r_a)
            self.M += self.q_b[start:end].T @ p
            self.row2[start:end] = norms.square()
            # W Aᵀ = W Q_a R_a, and x_i = s <b_i, (W Aᵀ)_i> = <w_i, dw_i>
            self.x[start:end] = self.scale * (self.B[start:end] * (p @ self.r_a)).sum(1)
        else:
            assert self._w_at is not None and self._a_t_w is not None
            p = (blk @ self._q_b_w).to(torch.float64)  # Wᵀ[blk] Q_b (b, r_b)
            self.M += (self.q_a[start:end].T @ p).T
            self.row2 += norms.square()
            self._w_at += (blk.T @ self._a_t_w[start:end]).to(torch.float64)
        self._seen += end - start

    def finish(
        self,
        *,
        magnitude: torch.Tensor | None = None,
        top: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    ) -> BaseAnalysis:
        """The numbers, once every row has been added.

        Args:
            magnitude: (m,) a DoRA adapter's stored magnitude vector.
            top: ``(U_W (m, K), S_W (K,), V_W (n, K))`` from :func:`top_singular`, for the overlaps with W's top-K
                singular subspaces.
        """
        expected = self.n if self.transposed else self.m
        if self._seen != expected:
            raise LoraOpsError(f"{self._seen} of {expected} rows of the base weight were added")
        if self.transposed:
            assert self._w_at is not None
            self.x = self.scale * (self.B * self._w_at).sum(1)
        m, n, k, s = self.m, self.n, self.k, self.scale
        sigma = self.sigma
        w2 = self.row2
        norm_w = float(w2.sum().sqrt())
        norm_dw = float(sigma.square().sum().sqrt())
        # per row: y_i = ||dw_i||² = s² b_iᵀ (A Aᵀ) b_i = s² ||R_a b_i||²
        y = (s * (self.B @ self.r_a.T)).square().sum(1)
        x = self.x
        wn = w2.sqrt()
        wp2 = (w2 + 2 * x + y).clamp_min(0)
        wpn = wp2.sqrt()
        denom = wpn + wn
        dm_rows = torch.where(denom > 0, (2 * x + y) / torch.where(denom > 0, denom, 1), torch.zeros_like(denom))
        ok = (wn > 0) & (wpn > 0)
        w2s, wp2s = torch.where(ok, w2, 1), torch.where(ok, wp2, 1)
        cos = ((w2 + x) / (wn * wpn).where(ok, torch.ones_like(wn))).clamp(-1, 1)
        sin2 = ((y - x.square() / w2s) / wp2s).clamp(0, 1)
        # 1 - cos = sin² / (1 + cos) avoids cancellation when cos is near 1; for cos <= 0 the direct form is exact
        one_minus_cos = torch.where(cos > 0, sin2 / (1 + cos), 1 - cos)
        dd = float(one_minus_cos[ok].mean()) if bool(ok.any()) else None
        eff_fro = eff_rel = None
        if magnitude is not None:
            mag = magnitude.detach().to(torch.float64).reshape(-1)
            if mag.numel() != m:
                raise ShapeMismatchError(f"the DoRA magnitude has {mag.numel()} entries for {m} output rows")
            dm_rows = mag - wn
            d = torch.where(wpn > 0, mag / torch.where(wpn > 0, wpn, 1), torch.ones_like(wpn))
            eff_rows = ((d - 1).square() * w2 + 2 * (d - 1) * d * x + d.square() * y).clamp_min(0)
            eff_fro = float(eff_rows.sum().sqrt())
            eff_rel = eff_fro / norm_w if norm_w > 0 else None
        d_m = float(dm_rows.abs().mean()) if m else 0.0
        reason = ZERO_BASE if norm_w == 0 else ZERO_UPDATE if k == 0 else None
        result = BaseAnalysis(
            shape=(m, n),
            rank=k,
            sigma=sigma[:k].tolist(),
            norm_W=norm_w,
            norm_dW=norm_dw,
            rel_fro=norm_dw / norm_w if norm_w > 0 else None,
            cos_W=None,
            proj_fro=None,
            proj_over_W=None,
            amplification=None,
            random_proj=None,
            alignment_over_random=None,
            dir_alignment=[],
            dM=d_m,
            dD=dd,
            dora_eff_fro=eff_fro,
            dora_rel_fro=eff_rel,
            reason=reason,
        )
        if k > 0:
            inner = float((self.M * self.core).sum())  # <W, dW> = <Q_bᵀ W Q_a, s R_b R_aᵀ>
            uk, vk = self.u[:, :k], self.vh[:k].T
            proj = uk.T @ self.M @ vk  # Uᵀ W V (k, k)
            proj_fro = float(proj.norm())
            result.dir_alignment = proj.diagonal().tolist()
            result.proj_fro = proj_fro
            result.amplification = norm_dw / proj_fro if proj_fro > 0 else None
            if norm_w > 0:
                result.cos_W = max(-1.0, min(1.0, inner / (norm_w * norm_dw)))
                result.proj_over_W = proj_fro / norm_w
                result.random_proj = random_projection_baseline(norm_w, m, n, k)
                result.alignment_over_random = proj_fro / result.random_proj
        if top is not None:
            result.base_top = self._top_overlap(*top)
        return result

    def singular_vectors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(U (m, k), V (n, k))``: dW's top-k singular vectors (k its numerical rank), float64."""
        k = self.k
        return self.q_b @ self.u[:, :k], self.q_a @ self.vh[:k].T

    def _top_overlap(self, u_w: torch.Tensor, s_w: torch.Tensor, v_w: torch.Tensor) -> BaseTopOverlap:
        kw, k = int(s_w.numel()), self.k
        s_w = s_w.to(torch.float64)
        out = BaseTopOverlap(
            k=kw,
            overlap_out=None,
            overlap_in=None,
            random_out=max(kw, k) / self.m,
            random_in=max(kw, k) / self.n,
            w_top_proj=float(s_w[: min(kw, k)].square().sum().sqrt()) if k else 0.0,
            spec_rel=float(self.sigma[0] / s_w[0]) if k and kw and float(s_w[0]) > 0 else None,
            sigma_W=s_w.tolist(),
        )
        if k and kw:
            u, v = self.singular_vectors()
            out.overlap_out = min(1.0, float((u_w.to(torch.float64).T @ u).square().sum()) / min(kw, k))
            out.overlap_in = min(1.0, float((v_w.to(torch.float64).T @ v).square().sum()) / min(kw, k))
        return out


def analyze_update(
    f: LoraFactors,
    W: torch.Tensor,
    *,
    transposed: bool = False,
    magnitude: torch.Tensor | None = None,
    block_rows: int = 1024,
    dtype: torch.dtype = torch.float32,
) -> BaseAnalysis:
    """:class:`BaseAccumulator` over an in-memory W (m, n) (or ``Wᵀ`` (n, m) when ``transposed``), ``block_rows``
    rows at a time."""
    acc = BaseAccumulator(f, transposed=transposed, dtype=dtype)
    for start in range(0, W.shape[0], max(1, block_rows)):
        acc.add(start, W[start : start + block_rows])
    return acc.finish(magnitude=magnitude)


def top_singular(
    W: torch.Tensor,
    k: int,
    *,
    oversample: int = 10,
    power_iters: int = 2,
    seed: int = 0,
    exact_max: int = 1 << 20,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """W's top-k singular triplets ``(U (m, k), S (k,), V (n, k))``, float64, k capped by min(m, n).

    Exact (``torch.linalg.svd``) when ``m n <= exact_max``; otherwise a seeded randomized SVD (Halko, Martinsson and
    Tropp 2011, algorithms 4.4 and 5.1): a Gaussian test matrix with ``k + oversample`` columns from
    ``torch.Generator().manual_seed(seed)``, ``power_iters`` power iterations re-orthonormalised by QR, then the SVD
    of the small ``Qᵀ W``. Cost ``O(power_iters m n (k + oversample))``.

    Example:
        >>> U, S, V = top_singular(torch.diag(torch.tensor([3.0, 2.0, 1.0])), 2)
        >>> S.tolist()
        [3.0, 2.0]
    """
    if W.ndim != 2:
        raise ShapeMismatchError(f"W must be a matrix, got {tuple(W.shape)}")
    m, n = W.shape
    k = max(0, min(k, m, n))
    if m * n <= exact_max or k + oversample >= min(m, n):
        u, s, vh = thin_svd(W.to(torch.float64))
        return u[:, :k], s[:k], vh[:k].T
    w = W.to(dtype)
    g = torch.Generator().manual_seed(seed)
    omega = torch.randn(n, k + oversample, generator=g, dtype=torch.float64).to(dtype)
    q = torch.linalg.qr(w @ omega).Q
    for _ in range(power_iters):
        q = torch.linalg.qr(w.T @ q).Q
        q = torch.linalg.qr(w @ q).Q
    small = (q.T @ w).to(torch.float64)  # (k + p, n)
    u_s, s, vh = thin_svd(small)
    return (q.to(torch.float64) @ u_s)[:, :k], s[:k], vh[:k].T


__all__ = [
    "ZERO_BASE",
    "ZERO_UPDATE",
    "BaseAccumulator",
    "BaseAnalysis",
    "BaseTopOverlap",
    "analyze_update",
    "numerical_rank",
    "random_projection_baseline",
    "top_singular",
]
