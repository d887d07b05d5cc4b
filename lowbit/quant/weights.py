"""Weight quantization parameters and rounding for [out, in] weights.

fp8 (e4m3/e5m2) is symmetric: s = max|w| / fp8_max, the cast does the rounding.
Per channel: one scale (and zero point) per output row (``axis=0``). Per group of G: one per
row and block of G inputs (``axis=1, group_size=G``); scale shape [out, in/G]. Per tensor: one.
Symmetric: s = max|w| / qmax.  Asymmetric: s = (max − min) / (qmax − qmin),
z = round(qmin − min / s); ranges always include 0. Scales never go below ``EPS``.
"""

from __future__ import annotations

import torch

from lowbit.ir.dialects.quant import EPS, expand_scale
from lowbit.quant.spec import QSpec


def _ranges(w: torch.Tensor, spec: QSpec, clip: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, dict]:
    if spec.granularity == "group":
        g = spec.group_size
        if w.shape[1] % g:
            raise ValueError(f"in features {w.shape[1]} are not a multiple of group size {g}")
        view = w.reshape(w.shape[0], -1, g)
        lo, hi, attrs = view.amin(-1), view.amax(-1), {"axis": 1, "group_size": g}
    elif spec.granularity == "channel":
        lo, hi, attrs = w.amin(1), w.amax(1), {"axis": 0}
    else:
        lo, hi, attrs = w.min(), w.max(), {}
    if clip is not None:  # a searched clipping ratio per row/group (AWQ)
        lo, hi = lo * clip, hi * clip
    return lo.clamp_max(0), hi.clamp_min(0), attrs


def weight_qparams(w: torch.Tensor, spec: QSpec, clip: torch.Tensor | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor | None, dict]:
    """(scale, zero point or None, dequantize attrs)."""
    qmin, qmax = spec.qrange
    lo, hi, attrs = _ranges(w, spec, clip)
    if spec.symmetric:
        return (torch.maximum(-lo, hi) / qmax).clamp_min(EPS).float(), None, attrs
    scale = ((hi - lo) / (qmax - qmin)).clamp_min(EPS)
    zp = torch.round(qmin - lo / scale).clamp(qmin, qmax)
    return scale.float(), zp.to(spec.dtype.storage), attrs


def apply_qparams(w: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor | None, spec: QSpec,
                  attrs: dict) -> torch.Tensor:
    """Integer codes of ``w`` under the given parameters (round to nearest, clamped)."""
    qmin, qmax = spec.qrange
    axis, group = attrs.get("axis"), attrs.get("group_size")
    if spec.dtype.is_float:  # fp8: scale, saturate, cast (the cast rounds)
        return (w / expand_scale(scale, w, axis, group)).clamp(qmin, qmax).to(spec.dtype.storage)
    q = torch.round(w / expand_scale(scale, w, axis, group))
    if zp is not None:
        q = q + expand_scale(zp, w, axis, group).to(q.dtype)
    return q.clamp(qmin, qmax).to(spec.dtype.storage)


def dequantize_codes(q: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor | None, attrs: dict) -> torch.Tensor:
    axis, group = attrs.get("axis"), attrs.get("group_size")
    x = q.float()
    if zp is not None:
        x = x - expand_scale(zp, x, axis, group).float()
    return x * expand_scale(scale, x, axis, group)


def fake_quantize(w: torch.Tensor, spec: QSpec, clip: torch.Tensor | None = None) -> torch.Tensor:
    """w rounded to the grid and back (the float weights a quantized layer computes with)."""
    scale, zp, attrs = weight_qparams(w, spec, clip)
    return dequantize_codes(apply_qparams(w, scale, zp, spec, attrs), scale, zp, attrs)
