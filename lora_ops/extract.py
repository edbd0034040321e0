"""A LoRA from a weight difference: the truncated SVD of ``dW = W_tuned - W_base``, exact or randomized.

Two ways to the rank-k factors of one (d_out, d_in) difference:

- **exact**: ``torch.linalg.svd`` of dW in float64 (``full_matrices=False``). By Eckart-Young the rank-k
  truncation is the optimum, and its error ``sqrt(sum(S[k:]²))`` is computed from the singular values directly.
  Cost ``O(d_out d_in min(d_out, d_in))``: used for small matrices.
- **randomized** (Halko, Martinsson & Tropp 2011, algorithms 4.4 + 5.1): a seeded Gaussian sketch of ``l = k + p``
  columns (oversampling ``p``), ``q`` power (subspace) iterations re-orthonormalised by QR at every half step,
  then the exact SVD of the small ``l x d_in`` matrix ``Qᵀ dW`` in float64. The matrix products run in dW's dtype
  (float32) on dW's device. Cost ``O(d_out d_in l (2q + 2))``.

Both return balanced factors ``B = U_k sqrt(S_k)`` (d_out, k) and ``A = sqrt(S_k) V_kᵀ`` (k, d_in), so
``B @ A`` is the rank-k approximation with scale 1 (PEFT: ``lora_alpha = r``).

Errors (relative Frobenius, ``||dW - B A||_F / ||dW||_F``) and what is exact about them:

- ``rel_error`` is the error of the returned factors. Exact path: ``sqrt(sum(S[k:]²)) / ||dW||_F``. Randomized
  path: the factors are the exact orthogonal projection ``U_k U_kᵀ dW`` (``U_k = Q Ũ_k``, and ``U_kᵀ dW =
  S_k V_kᵀ``), so by Pythagoras ``err² = ||dW||_F² - sum(S̃[:k]²)`` where ``S̃`` are the singular values of
  ``Qᵀ dW``. It is evaluated as ``||R||_F² + sum(S̃[k:]²)`` with ``R = dW - Q Qᵀ dW`` (what the sketch misses):
  ``||R||_F² = ||dW||_F² - ||Qᵀ dW||_F²`` (sums in float64), or, where that difference is below 1e-4 of
  ``||dW||_F²`` and would lose its digits to cancellation, ``||R||_F²`` computed from R itself.
  So ``rel_error`` is exact up to float32 rounding of the products in both paths.
- ``opt_rel_error`` is the optimum at the same k, ``sqrt(sum(σ[k:]²)) / ||dW||_F`` over dW's true singular
  values σ. Exact path: equal to ``rel_error``. Randomized path: an *estimate*, never above ``rel_error``
  (``S̃_i <= σ_i``, so the achieved error is at least the optimum): the captured top-k energy
  ``E = sum(S̃[:k]²)`` grows with each half step of the power iteration towards ``sum(σ[:k]²)``; the estimate
  assumes the remaining gap is at most the last half step's gain (geometric convergence with ratio <= 1/2), i.e.
  ``opt² ≈ err² - (E_last - E_previous)``. With ``q = 0`` there is no previous half step and the estimate equals
  ``rel_error``. A dense SVD measures the true optimum (``benchmarks/bench_extract.py`` does).

Dynamic rank rules (``energy``, ``sv_ratio``, ``sv_fro``; see :func:`lora_ops.rank.choose_rank`) need more of the
spectrum than the k kept: ``||dW||_F²`` is known exactly, and the randomized path grows the sketch (doubling l)
until the rule's k lies within the first ``l - p`` sketched values, falling back to the exact path once l would
reach half of ``min(d_out, d_in)``. The sketched values are below the true ones, so a rule decided on them keeps
at least as many values as it would on the true spectrum, never fewer.
"""

from __future__ import annotations

import math
from typing import Literal, NamedTuple

import torch

from lora_ops.errors import LoraOpsError, NonFiniteError
from lora_ops.rank import choose_rank
from lora_ops.svd import thin_svd


Method = Literal["auto", "exact", "randomized"]

#: ``auto`` runs the exact SVD when ``min(d_out, d_in)`` is at most this, or the sketch would be at least half of it
EXACT_MAX_DIM = 512
#: power (subspace) iterations of the randomized path
POWER_ITERS = 2


def oversampling(k: int) -> int:
    """The randomized sketch's extra columns for rank k: ``max(10, k // 4)``."""
    return max(10, k // 4)


class ExtractedLora(NamedTuple):
    """Result of :func:`extract_lora` for one (d_out, d_in) difference.

    Attributes:
        A: (k, d_in) ``sqrt(S_k) V_kᵀ``, float32.
        B: (d_out, k) ``U_k sqrt(S_k)``, float32.
        rank: k.
        singular_values: float64, descending: all of dW's (exact) or the l sketched ones (randomized).
        norm: ``||dW||_F``.
        rel_error: ``||dW - B A||_F / ||dW||_F`` of the returned factors (see the module docstring).
        opt_rel_error: the optimum at rank k: exact (exact path) or an estimate (randomized path).
        method: ``"exact"`` or ``"randomized"``.
        sketch: l, the sketch's columns (0 for the exact path).
    """

    A: torch.Tensor
    B: torch.Tensor
    rank: int
    singular_values: torch.Tensor
    norm: float
    rel_error: float
    opt_rel_error: float
    method: str
    sketch: int


def _balanced(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``A = sqrt(S_k) V_kᵀ`` (k, d_in) and ``B = U_k sqrt(S_k)`` (d_out, k), float32."""
    root = s[:k].sqrt()
    b = (u[:, :k].to(torch.float64) * root).to(torch.float32)
    a = (root[:, None] * vh[:k].to(torch.float64)).to(torch.float32)
    return a.contiguous(), b.contiguous()


def _rule_rank(
    s: torch.Tensor,
    total: float,
    *,
    rank: int | None,
    energy: float | None,
    sv_ratio: float | None,
    sv_fro: float | None,
    max_rank: int | None,
) -> int:
    """k by :func:`choose_rank` on singular values ``s`` (all, or the leading ones of a sketch) whose squares sum to
    at most ``total = ||dW||_F²``: the energy rules see the rest of ``total`` as one last value, so a k of
    ``len(s) + 1`` means the rule needs more of the spectrum than ``s`` holds."""
    if energy is not None or sv_fro is not None:
        rest = max(total - float(s.square().sum()), 0.0)
        s = torch.cat([s, torch.tensor([math.sqrt(rest)], dtype=s.dtype)])
    return choose_rank(s, rank=rank, energy=energy, sv_ratio=sv_ratio, sv_fro=sv_fro, max_rank=max_rank)


def _exact(
    delta: torch.Tensor, total: float, rules: dict[str, float | int | None]
) -> tuple[int, torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """Dense SVD of ``delta`` in float64: k, U (m, r), S (r,) on the CPU, Vᵀ (r, n), and the optimal rel. error."""
    u, s, vh = thin_svd(delta.to(torch.float64))
    s = s.cpu()
    k = choose_rank(s, **rules)  # type: ignore[arg-type]
    err = float(s[k:].square().sum().sqrt()) / math.sqrt(total)
    return k, u, s, vh, err


#: rows per block of the float64 sums over a (d_out, d_in) matrix (bounded temporaries)
ROWS = 256


def _sq_norm(x: torch.Tensor, minus: tuple[torch.Tensor, torch.Tensor] | None = None) -> float:
    """``||x||_F²`` (or ``||x - Q C||_F²`` with ``minus = (Q, C)``: Q (m, l), C (l, n)), summed in float64 over
    blocks of :data:`ROWS` rows, so no temporary larger than a block is made."""
    total = 0.0
    for i in range(0, x.shape[0], ROWS):
        block = x[i : i + ROWS]
        if minus is not None:
            block = block - minus[0][i : i + ROWS] @ minus[1]
        total += float(torch.linalg.vector_norm(block, dtype=torch.float64)) ** 2
    return total


def _orth(x: torch.Tensor) -> torch.Tensor:
    """Orthonormal columns (Householder QR) spanning tall ``x`` (m, l)."""
    return torch.linalg.qr(x, mode="reduced").Q


def _randomized(
    delta: torch.Tensor, cols: int, power_iters: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Sketch ``delta`` (m, n) with l = ``cols`` columns: Q (m, l) orthonormal, the SVD of ``Qᵀ delta`` (Ũ (l, l),
    S̃ (l,), Vᵀ (l, n), float64), and the singular values (l,) captured by the half step before the last (None
    without power iterations)."""
    n = delta.shape[1]
    omega = torch.randn(n, cols, generator=generator, device=delta.device, dtype=delta.dtype)
    q = _orth(delta @ omega)
    before: torch.Tensor | None = None
    for i in range(power_iters):
        z = _orth(delta.T @ q)
        y = delta @ z
        if i == power_iters - 1:  # y's spectrum: dW's, projected on span(z)
            before = torch.linalg.svdvals(y.to(torch.float64)).cpu()
        q = _orth(y)
    ub, s, vh = thin_svd((q.T @ delta).to(torch.float64))
    return q, ub, s, vh, before


def extract_lora(
    delta: torch.Tensor,
    *,
    rank: int | None = None,
    energy: float | None = None,
    sv_ratio: float | None = None,
    sv_fro: float | None = None,
    max_rank: int | None = None,
    method: Method = "auto",
    power_iters: int = POWER_ITERS,
    oversample: int | None = None,
    seed: int = 0,
) -> ExtractedLora | None:
    """The rank-k LoRA factors of a weight difference, k chosen by exactly one rule (:func:`choose_rank`).

    Args:
        delta: (d_out, d_in) ``W_tuned - W_base``, any float dtype, any device; computed in float32 (randomized)
            or float64 (exact). A conv kernel's difference is flattened by the caller to (d_out, d_in kh kw).
        rank, energy, sv_ratio, sv_fro, max_rank: the rule, as :func:`lora_ops.rank.choose_rank`.
        method: ``exact``, ``randomized`` or ``auto`` (exact when ``min(d_out, d_in) <= EXACT_MAX_DIM`` or the
            sketch would reach half of it).
        power_iters: q, power iterations of the randomized path.
        oversample: p (default :func:`oversampling` of k).
        seed: seeds the sketch (same seed and input, same factors).

    Returns:
        The factors and errors (see the module docstring), on ``delta``'s device; None when ``delta`` is zero.

    Raises:
        NonFiniteError: delta holds NaN or inf.
        LoraOpsError: a bad rule, or delta not a 2-D floating tensor.

    Example:
        >>> d = torch.randn(96, 4) @ torch.randn(4, 80)
        >>> x = extract_lora(d, rank=4)
        >>> x.rank, x.A.shape, x.B.shape, x.rel_error < 1e-6
        (4, torch.Size([4, 80]), torch.Size([96, 4]), True)
    """
    if delta.dim() != 2 or not delta.is_floating_point():
        raise LoraOpsError(f"delta must be a 2-D float tensor (d_out, d_in), got {tuple(delta.shape)} {delta.dtype}")
    if method not in ("auto", "exact", "randomized"):
        raise LoraOpsError(f"method must be auto, exact or randomized, got {method!r}")
    if power_iters < 0:
        raise LoraOpsError(f"power_iters must be at least 0, got {power_iters}")
    if oversample is not None and oversample < 0:
        raise LoraOpsError(f"oversample must be at least 0, got {oversample}")
    rules: dict[str, float | int | None] = {
        "rank": rank,
        "energy": energy,
        "sv_ratio": sv_ratio,
        "sv_fro": sv_fro,
        "max_rank": max_rank,
    }
    choose_rank(torch.ones(1, dtype=torch.float64), **rules)  # type: ignore[arg-type]  # the rule itself is valid
    work = delta.detach()
    work = work if work.dtype in (torch.float32, torch.float64) else work.to(torch.float32)
    total = _sq_norm(work)
    if not math.isfinite(total):
        raise NonFiniteError("the weight difference holds NaN or inf")
    if total == 0.0:
        return None
    norm = math.sqrt(total)
    small_dim = min(work.shape)

    def sketch_size(k: int) -> int:
        return min(k + (oversampling(k) if oversample is None else oversample), small_dim)

    k0 = min(rank if rank is not None else max_rank if max_rank is not None else 32, small_dim)
    cols = sketch_size(k0)
    if method == "exact" or (method == "auto" and (small_dim <= EXACT_MAX_DIM or 2 * cols >= small_dim)):
        k, u, s, vh, err = _exact(work, total, rules)
        a, b = _balanced(u, s.to(u.device), vh, k)
        return ExtractedLora(a, b, k, s, norm, err, err, "exact", 0)
    generator = torch.Generator(device=work.device).manual_seed(seed)
    while True:
        q, ub, s, vh, before = _randomized(work, cols, power_iters, generator)
        s_cpu = s.cpu()
        k = _rule_rank(s_cpu, total, **rules)  # type: ignore[arg-type]
        # a dynamic rule's k counts only within the first cols - p values (the last p are the sketch's margin)
        reliable = cols if (rank is not None or cols >= small_dim) else k0
        if k <= reliable:
            break
        if method == "auto" and 2 * sketch_size(min(2 * max(k, k0), small_dim)) >= small_dim:
            k, u, s, vh, err = _exact(work, total, rules)
            a, b = _balanced(u, s.to(u.device), vh, k)
            return ExtractedLora(a, b, k, s, norm, err, err, "exact", 0)
        k0 = min(2 * max(k, k0), small_dim)
        cols = sketch_size(k0)
    k = min(k, cols)
    captured = float(s_cpu.square().sum())
    missed = total - captured
    if missed < 1e-4 * total:  # the difference would lose its digits: measure what the sketch misses directly
        missed = _sq_norm(work, (q, q.T @ work))
    err2 = max(missed, 0.0) + float(s_cpu[k:].square().sum())
    gain = 0.0
    if before is not None:
        gain = max(float(s_cpu[:k].square().sum()) - float(before[:k].square().sum()), 0.0)
    err = math.sqrt(err2) / norm
    opt = math.sqrt(max(err2 - gain, 0.0)) / norm
    u = q.to(torch.float64) @ ub[:, :k]
    a, b = _balanced(u, s[:k], vh, k)
    return ExtractedLora(a, b, k, s_cpu, norm, err, opt, "randomized", cols)


def extract_lora_like(
    delta: torch.Tensor,
    kind: Literal["linear", "conv1d", "conv", "embedding"],
    **options: object,
) -> ExtractedLora | None:
    """:func:`extract_lora` of a stored weight difference, shaped as PEFT stores that layer's factors.

    - ``linear``: delta (d_out, d_in); A (k, d_in), B (d_out, k).
    - ``conv1d`` (GPT-2's Conv1D, ``fan_in_fan_out``): delta stored (d_in, d_out); factors of its transpose,
      A (k, d_in), B (d_out, k), as PEFT stores them.
    - ``conv`` (Conv2d): delta (d_out, d_in, kh, kw); A (k, d_in, kh, kw), B (d_out, k, 1, 1).
    - ``embedding``: delta (num_embeddings, dim); PEFT's ``lora_embedding_A`` (k, num_embeddings) and
      ``lora_embedding_B`` (dim, k), factors of its transpose (PEFT adds ``(B @ A)ᵀ * scale``).
    """
    if kind == "linear":
        return extract_lora(delta, **options)  # type: ignore[arg-type]
    if kind in ("conv1d", "embedding"):
        return extract_lora(delta.T, **options)  # type: ignore[arg-type]
    if kind == "conv":
        if delta.dim() != 4:
            raise LoraOpsError(f"a conv difference must be 4-D (out, in, kh, kw), got {tuple(delta.shape)}")
        x = extract_lora(delta.reshape(delta.shape[0], -1), **options)  # type: ignore[arg-type]
        if x is None:
            return None
        a = x.A.reshape(x.rank, *delta.shape[1:])
        b = x.B.reshape(delta.shape[0], x.rank, 1, 1)
        return x._replace(A=a, B=b)
    raise LoraOpsError(f"unknown layer kind {kind!r}")
