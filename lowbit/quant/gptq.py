"""GPTQ: quantize a weight column by column, each time spreading the rounding error over the
columns not yet quantized, weighted by the inverse Hessian of the layer's inputs.

With H = 2·XᵀX (+ λ·mean(diag H)·I damping) and U the upper Cholesky factor of H⁻¹, for
column i:  q_i = Q(w_i),  e = (w_i − q_i) / U_ii,  w_j −= e·U_ij for j > i
(done in blocks of columns for speed). With groups, each group's scale is taken from the
weights as updated when the loop reaches the group (a short last group where the group size
does not divide the columns). ``act_order`` visits columns by decreasing diag(H), with "static
groups": the group scales are then fixed up front from the original weights, in column order.
Scales follow the spec's observer (``mse``: the shrunk range with the least round-trip error).
"""

from __future__ import annotations

import torch

from lowbit.quant.spec import QSpec
from lowbit.quant.weights import apply_qparams, dequantize_codes, weight_qparams


def gptq_quantize(w: torch.Tensor, h: torch.Tensor, spec: QSpec, damp: float = 0.01,
                  act_order: bool = False, block: int = 128
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, dict]:
    """(codes, scale, zero point, dequantize attrs) for the [out, in] weight ``w`` given the
    input Hessian ``h`` [in, in]. The parameters follow ``spec`` as round-to-nearest would."""
    w = w.detach().double().clone()
    h = h.detach().double().clone()
    cols = w.shape[1]
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h += damp * torch.diag(h).mean() * torch.eye(cols, dtype=h.dtype)
    perm = torch.argsort(torch.diag(h), descending=True) if act_order else torch.arange(cols)
    w, h = w[:, perm], h[perm][:, perm]
    u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)

    group = spec.group_size if spec.granularity == "group" else None
    fixed = _fixed_params(w, perm, spec, group, act_order)
    scale_cols = torch.zeros_like(w)  # per column: the scale and zero point it was rounded with
    zp_cols = torch.zeros_like(w)
    current = None
    for i1 in range(0, cols, block):
        i2 = min(i1 + block, cols)
        w1, err1 = w[:, i1:i2].clone(), torch.zeros(w.shape[0], i2 - i1, dtype=w.dtype)
        for i in range(i2 - i1):
            col = i1 + i
            if fixed is None and col % group == 0:  # a new group: scales from the updated weights
                current = _row_params(torch.cat([w1[:, i:], w[:, i2:]], 1)[:, :group], spec)
            s, z = current if fixed is None else _fixed_column(fixed, int(perm[col]), group)
            q = (torch.clamp(torch.round(w1[:, i] / s) + z, *spec.qrange) - z) * s
            scale_cols[:, col], zp_cols[:, col] = s, z
            e = (w1[:, i] - q) / u[col, col]
            w1[:, i:] -= e[:, None] * u[col, col:i2][None, :]
            w1[:, i] = q
            err1[:, i] = e
        w[:, i1:i2] = w1
        w[:, i2:] -= err1 @ u[i1:i2, i2:]
    inv = torch.argsort(perm)
    return _pack(w[:, inv].float(), scale_cols[:, inv], zp_cols[:, inv], spec, group)


def _row_params(w: torch.Tensor, spec: QSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row (scale, zero point) of ``w`` as doubles; zero point 0 when symmetric."""
    scale, zp, _ = weight_qparams(w.float(), QSpec(spec.dtype, "channel", None, spec.symmetric,
                                                   observer=spec.observer))
    return scale.double(), (zp.double() if zp is not None else torch.zeros_like(scale.double()))


def _fixed_params(w, perm, spec, group, act_order):
    """Parameters fixed before the loop: per channel always; per group under act_order
    (from the original weights, in the original column order)."""
    if group is None:
        return _row_params(w, spec)
    if not act_order:
        return None
    original = w[:, torch.argsort(perm)].float()
    scale, zp, _ = weight_qparams(original, spec)
    return scale.double(), (zp.double() if zp is not None else torch.zeros_like(scale.double()))


def _fixed_column(fixed, original_col: int, group: int | None):
    scale, zp = fixed
    if group is None:
        return scale, zp
    return scale[:, original_col // group], zp[:, original_col // group]


def _pack(wq, scale_cols, zp_cols, spec, group):
    """Integer codes and compact scales from the per-column parameters used in the loop."""
    if group is None:
        scale, zp = scale_cols[:, 0].float(), zp_cols[:, 0]
        attrs = {"axis": 0}
    else:
        scale, zp = scale_cols[:, ::group].float(), zp_cols[:, ::group]
        attrs = {"axis": 1, "group_size": group}
    zp_t = None if spec.symmetric else zp.round().to(spec.dtype.storage)
    q = apply_qparams(wq, scale, zp_t, spec, attrs)
    assert torch.allclose(dequantize_codes(q, scale, zp_t, attrs), wq, atol=1e-4 * float(scale.max()) + 1e-6)
    return q, scale, zp_t, attrs
