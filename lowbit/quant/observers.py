"""Streaming statistics of a tensor over a calibration set, and the ranges chosen from them.

``TensorStats`` keeps the running min/max, the per-channel absolute max over the last dim
(what SmoothQuant needs) and a signed histogram whose range doubles when a batch exceeds it
(bins merge pairwise), so memory stays fixed however long the calibration set is. Ranges:

- minmax:     [min, max]
- percentile: the 0.01% and 99.99% quantiles of the histogram
- mse:        the clipping range minimizing the expected squared quantization error, with
              uniform rounding noise Δ²/12 inside the range and (|x| − clip)² outside it
- kl:         the clipping threshold minimizing KL(P‖Q) between the histogram and its
              quantized version (TensorRT's entropy calibration, symmetric)
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from lowbit.ir.dialects.quant import EPS

BINS = 2048


@dataclass
class TensorStats:
    min: float = float("inf")
    max: float = float("-inf")
    channel_absmax: torch.Tensor | None = None
    hist: torch.Tensor = field(default_factory=lambda: torch.zeros(BINS, dtype=torch.float64))
    hist_range: float = 0.0  # the histogram covers [-hist_range, hist_range]
    batches: int = 0

    def update(self, x: torch.Tensor) -> None:
        x = x.detach().float()
        self.min = min(self.min, x.min().item())
        self.max = max(self.max, x.max().item())
        absmax = x.abs().reshape(-1, x.shape[-1]).amax(0) if x.dim() else x.abs().reshape(1)
        self.channel_absmax = absmax if self.channel_absmax is None else torch.maximum(self.channel_absmax, absmax)
        self._add_to_histogram(x)
        self.batches += 1

    def _add_to_histogram(self, x: torch.Tensor) -> None:
        need = max(abs(self.min), abs(self.max), EPS)
        if self.hist_range == 0.0:
            self.hist_range = need
        while need > self.hist_range:  # double the range: pairs of bins merge into the middle half
            merged = self.hist.reshape(BINS // 2, 2).sum(1)
            self.hist = torch.zeros_like(self.hist)
            self.hist[BINS // 4: BINS // 4 + BINS // 2] = merged
            self.hist_range *= 2
        self.hist += torch.histc(x.flatten().double(), BINS, -self.hist_range, self.hist_range)

    def bin_centers(self) -> torch.Tensor:
        width = 2 * self.hist_range / BINS
        return -self.hist_range + width * (torch.arange(BINS, dtype=torch.float64) + 0.5)

    # ---- ranges ----------------------------------------------------------------------------
    def range(self, observer: str, levels: int, symmetric: bool) -> tuple[float, float]:
        lo, hi = min(self.min, 0.0), max(self.max, 0.0)
        if observer == "percentile":
            lo, hi = self._percentile(1e-4)
        elif observer == "mse":
            lo, hi = self._mse(levels, symmetric)
        elif observer == "kl":
            t = self._kl(levels)
            lo, hi = -t, t
        if symmetric:
            m = max(abs(lo), abs(hi))
            return -m, m
        return lo, hi

    def _percentile(self, tail: float) -> tuple[float, float]:
        cdf = self.hist.cumsum(0) / self.hist.sum().clamp_min(1)
        centers = self.bin_centers()
        lo = centers[int(torch.searchsorted(cdf, torch.tensor(tail, dtype=torch.float64)))].item()
        hi = centers[min(int(torch.searchsorted(cdf, torch.tensor(1 - tail, dtype=torch.float64))), BINS - 1)].item()
        return max(min(lo, 0.0), self.min), min(max(hi, 0.0), self.max)

    def _mse(self, levels: int, symmetric: bool) -> tuple[float, float]:
        centers, counts = self.bin_centers(), self.hist
        lo0, hi0 = min(self.min, 0.0), max(self.max, 0.0)
        if symmetric:
            m = max(-lo0, hi0)
            lo0, hi0 = -m, m
        best, best_err = (lo0, hi0), float("inf")
        for f in torch.linspace(0.2, 1.0, 81).tolist():
            lo, hi = lo0 * f, hi0 * f
            step = max(hi - lo, EPS) / (levels - 1)
            clipped = torch.clamp(centers, lo, hi)
            err = (counts * ((centers - clipped) ** 2 + (step ** 2 / 12) * (centers == clipped))).sum().item()
            if err < best_err:
                best, best_err = (lo, hi), err
        return best

    def _kl(self, levels: int) -> float:
        """Symmetric threshold by entropy calibration on the |x| histogram."""
        half = BINS // 2
        absh = (self.hist[half:] + self.hist[:half].flip(0)).clone()
        width = self.hist_range / half
        quant_bins = levels // 2
        best_t, best_kl = self.hist_range, float("inf")
        for i in range(quant_bins, half + 1, 16):
            p = absh[:i].clone()
            p[-1] += absh[i:].sum()
            if p.sum() == 0:
                continue
            chunks = torch.tensor_split(absh[:i], quant_bins)
            q = torch.cat([torch.where(c > 0, c.sum() / (c > 0).sum().clamp_min(1), torch.zeros_like(c)) for c in chunks])
            p, q = p / p.sum(), q / q.sum().clamp_min(1e-12)
            mask = p > 0
            kl = (p[mask] * torch.log(p[mask] / q[mask].clamp_min(1e-12))).sum().item()
            if kl < best_kl:
                best_kl, best_t = kl, i * width
        return best_t


def scale_zero_point(lo: float, hi: float, qmin: int, qmax: int, symmetric: bool) -> tuple[float, int]:
    """Affine parameters covering [lo, hi] (which must contain 0). A zero range gives scale EPS."""
    if symmetric:
        return max(max(abs(lo), abs(hi)) / qmax, EPS), 0
    scale = max((hi - lo) / (qmax - qmin), EPS)
    zero_point = int(round(qmin - lo / scale))
    return scale, max(qmin, min(qmax, zero_point))
