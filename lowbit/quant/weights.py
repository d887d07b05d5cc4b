"""Weight quantization parameters and rounding for [out, in] weights.

fp8 (e4m3/e5m2) is symmetric: s = max|w| / fp8_max, the cast does the rounding.
Per channel: one scale (and zero point) per output row (``axis=0``). Per group of G: one per
row and block of G inputs (``axis=1, group_size=G``); scale shape [out, ⌈in/G⌉] (a last group
of in mod G inputs when G does not divide in). Per tensor: one.
Symmetric: s = max|w| / qmax.  Asymmetric: s = (max − min) / (qmax − qmin),
z = round(qmin − min / s); ranges always include 0. Scales never go below ``EPS``. With the
``mse`` observer (``int4/group128/asym/mse``) each row's or group's range is shrunk by the ratio
with the least round-trip error (``_mse_clip``).
"""

from __future__ import annotations

import torch

from lowbit.ir.dialects.quant import EPS, expand_scale
from lowbit.quant.spec import QSpec


def group_view(w: torch.Tensor, g: int) -> torch.Tensor:
    """[out, in] as [out, ⌈in/g⌉, g]; a short last group is padded by repeating its own last
    column, so its range (and MSE search) is that of its real values."""
    pad = -w.shape[1] % g
    if pad:
        w = torch.cat([w, w[:, -1:].expand(-1, pad)], 1)
    return w.reshape(w.shape[0], -1, g)


def _ranges(w: torch.Tensor, spec: QSpec, clip: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, dict]:
    if spec.granularity == "group":
        view, attrs = group_view(w, spec.group_size), {"axis": 1, "group_size": spec.group_size}
    elif spec.granularity == "channel":
        view, attrs = w[:, None, :], {"axis": 0}
    else:
        view, attrs = w.reshape(1, 1, -1), {}
    lo, hi = view.amin(-1).clamp_max(0), view.amax(-1).clamp_min(0)
    if clip is None and spec.observer == "mse":
        clip = _mse_clip(view, lo, hi, spec)
    if clip is not None:  # a clipping ratio per row/group (searched here, or by AWQ)
        lo, hi = lo * clip.reshape(lo.shape), hi * clip.reshape(hi.shape)
    shape = {"group": lo.shape, "channel": lo.shape[:1]}.get(spec.granularity, ())
    return lo.reshape(shape), hi.reshape(shape), attrs


MSE_GRID, MSE_MIN, MSE_NORM = 100, 0.2, 2.4  # shrink ratios 1, 0.99, ... > 0.2; error Σ|w − ŵ|^2.4


def _mse_clip(view: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, spec: QSpec) -> torch.Tensor:
    """Per row/group, the ratio r of the range [r·min, r·max] whose round trip has the least
    Σ|w − ŵ|^2.4 (the MSE weight observer of GPTQ's reference code and llm-compressor)."""
    best = torch.ones_like(lo)
    best_err = torch.full_like(lo, float("inf"))
    for i in range(int(MSE_GRID * (1 - MSE_MIN))):
        r = 1 - i / MSE_GRID
        scale, zp = _scale_zero(lo * r, hi * r, spec)
        q = torch.round(view / scale[..., None]) + (zp[..., None] if zp is not None else 0)
        q = q.clamp(*spec.qrange) - (zp[..., None] if zp is not None else 0)
        if spec.dtype.is_float:
            q = (view / scale[..., None]).clamp(*spec.qrange).to(spec.dtype.storage).float()
        err = (q * scale[..., None] - view).abs().pow(MSE_NORM).sum(-1)
        better = err < best_err
        best, best_err = torch.where(better, r, best), torch.where(better, err, best_err)
    return best


def _scale_zero(lo: torch.Tensor, hi: torch.Tensor, spec: QSpec) -> tuple[torch.Tensor, torch.Tensor | None]:
    qmin, qmax = spec.qrange
    if spec.symmetric:
        return (torch.maximum(-lo, hi) / qmax).clamp_min(EPS), None
    scale = ((hi - lo) / (qmax - qmin)).clamp_min(EPS)
    return scale, torch.round(qmin - lo / scale).clamp(qmin, qmax)


def weight_qparams(w: torch.Tensor, spec: QSpec, clip: torch.Tensor | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor | None, dict]:
    """(scale, zero point or None, dequantize attrs)."""
    lo, hi, attrs = _ranges(w, spec, clip)
    scale, zp = _scale_zero(lo, hi, spec)
    return scale.float(), (zp.to(spec.dtype.storage) if zp is not None else None), attrs


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
    """w rounded to the grid and back (the float weights a quantized layer computes with).
    Float32 weights on an integer grid take the same steps on [rows, groups, size] views with
    the scales broadcast, in place: the same values, without the codes and the expanded scales
    (AWQ's and SmoothQuant's searches call this once per grid point on every weight)."""
    if spec.dtype.is_float or w.dtype != torch.float32 or w.dim() != 2:
        scale, zp, attrs = weight_qparams(w, spec, clip)
        return dequantize_codes(apply_qparams(w, scale, zp, spec, attrs), scale, zp, attrs)
    lo, hi, _ = _ranges(w, spec, clip)
    scale, zp = _scale_zero(lo, hi, spec)
    if spec.granularity == "group":
        view = group_view(w, spec.group_size)
    else:
        view = w[:, None, :] if spec.granularity == "channel" else w.reshape(1, 1, -1)
    scale = scale.reshape(*view.shape[:2], 1)
    q = torch.round(view / scale)
    qmin, qmax = spec.qrange
    if zp is None:
        q.clamp_(qmin, qmax)
    else:
        zp = zp.reshape(scale.shape)
        q.add_(zp).clamp_(qmin, qmax).sub_(zp)
    return q.mul_(scale).reshape(w.shape[0], -1)[:, : w.shape[1]]
