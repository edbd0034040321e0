"""Exact folds of LyCORIS factorizations into plain LoRA factors (LoCon-Tucker cores, LoHa products).

Both are exact: the folded LoRA's update equals the LyCORIS update, at a larger rank for LoHa.
"""

from __future__ import annotations

import torch


def _stored_dtype(*inputs: torch.Tensor) -> torch.dtype:
    """The wider of the inputs' dtypes and float32; an 8-bit float input counts as float32 (torch promotes no
    float8 type, and its values are exact in float32)."""
    out = torch.float32
    for t in inputs:
        if t.dtype.itemsize > 1:
            out = torch.promote_types(out, t.dtype)
    return out


def fold_tucker(mid: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """LoCon-Tucker to LoRA at the same rank, exactly: A[p,i,h,w] = sum_q mid[p,q,h,w] down[q,i].

    Computed in float64 and stored in the wider of the inputs' dtype and float32 (new tensors, so no stored
    dtype to keep; 8-bit float inputs give float32)."""
    out_dtype = _stored_dtype(mid, down)
    a = torch.einsum("pqhw,qi->pihw", mid.double(), down.double().flatten(1))
    return a.to(out_dtype).contiguous()


def fold_loha(x: torch.Tensor, y: torch.Tensor, *, transpose: bool) -> torch.Tensor:
    """One factor of the exact rank-r1·r2 LoRA of a LoHa update (w1a@w1b) * (w2a@w2b).

    B[o, (p,q)] = w1a[o,p] w2a[o,q] (``transpose=False``, x=w1a, y=w2a); A[(p,q), i] = w1b[p,i] w2b[q,i]
    (``transpose=True``, x=w1b, y=w2b); then B @ A = (w1a@w1b) * (w2a@w2b) element-wise. float64 math, stored
    in the wider of the inputs' dtype and float32 (8-bit float inputs give float32)."""
    out_dtype = _stored_dtype(x, y)
    if transpose:
        f = torch.einsum("pi,qi->pqi", x.double().flatten(1), y.double().flatten(1)).reshape(-1, x[0].numel())
    else:
        f = torch.einsum("op,oq->opq", x.double(), y.double()).reshape(x.shape[0], -1)
    return f.to(out_dtype).contiguous()
