"""GPTQ: quantize a weight column by column, each time spreading the rounding error over the
columns not yet quantized, weighted by the inverse Hessian of the layer's inputs.

With H = 2·XᵀX (+ λ·mean(diag H)·I damping) and U the upper Cholesky factor of H⁻¹, for
column i:  q_i = Q(w_i),  e = (w_i − q_i) / U_ii,  w_j −= e·U_ij for j > i
(done in blocks of columns for speed). With groups, each group's scale is taken from the
weights as updated when the loop reaches the group (a short last group where the group size
does not divide the columns). ``act_order`` visits columns by decreasing diag(H), with "static
groups": the group scales are then fixed up front from the original weights, in column order.
Scales follow the spec's observer (``mse``: the shrunk range with the least round-trip error).

``refit`` then keeps the integer codes and zero points and solves each row's scales anew for
the least GPTQ error (W − Ŵ)·H·(W − Ŵ)ᵀ against the original weights: with d = q − z and one
scale per group, Ŵ_row = Σ_g s_g·d_g is linear in the row's scales, so they are the solution of
a G×G system (DᵀHD)·s = DᵀH·w. The scales were chosen before the codes (from the range of the
weights as GPTQ had updated them); once the codes are known, the range is no longer the best
scale for them. Costs about what the GPTQ loop costs (rows·in² multiply-adds).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lowbit.quant.spec import QSpec
from lowbit.quant.weights import apply_qparams, dequantize_codes, weight_qparams


@dataclass
class FloatTarget:
    """Moves GPTQ's target from the layer's weights W to the float model's outputs (asymmetric
    calibration, as GPTAQ). X̃ are the inputs the Hessian H = X̃ᵀX̃ was taken on (the model whose
    earlier layers are already quantized) and X the float model's inputs at the same tokens.
    The loop rounds W* = W + f·Δ, Δ = W·(C − H)·H⁻¹ with C = XᵀX̃, in place of W. At f = 1,
    W* = W·C·H⁻¹ is the least-squares map from X̃ to X·Wᵀ, and since
    ‖Ŵ·X̃ᵀ − W·Xᵀ‖² = ‖(Ŵ − W*)·X̃ᵀ‖² + const, GPTQ on W* with H minimizes the error against the
    float outputs. H⁻¹ is the damped inverse the loop uses (UᵀU), so Δ costs two products with U.

    The sums come in one of two forms, the same in exact arithmetic (both take every column of
    W, including an input the quantized model never sets, where the float model may: its part
    of the float outputs is residual). Per input (shared by the layers reading it): ``cross`` =
    C and ``gap`` = Σ (x − x̃)ᵀ(x − x̃) [in, in]. Per layer:
    ``pull`` = W·(C − H) = Rᵀ·X̃ [out, in] and ``misfit`` = ‖R‖², summed over the tokens with
    R = (X − X̃)·Wᵀ the residual the float weights leave, cheaper where the layers reading an
    input have fewer outputs in all than it has features (o_proj, down_proj).

    Δ is a regression fitted on the calibration tokens, and on few tokens it fits their noise.
    With the number of ``tokens`` n, f = ``toward`` × the positive-part James–Stein factor
    1 − E‖noise in Δ‖²/‖Δ‖², all in the norm of H: the residual's variance after the fit σ² =
    (‖R‖² − ‖R fitted‖²)/(n − k) and k = tr(H·(H + λI)⁻¹) the fit's degrees of freedom, the noise
    is σ²·k·n/(n − k − 1) (out of sample). Plenty of tokens: f ≈ ``toward``; tokens near the
    width: f → 0, plain GPTQ. ``moved`` is set to f."""

    cross: torch.Tensor | None = None
    toward: float = 1.0
    gap: torch.Tensor | None = None
    tokens: int = 0
    moved: float | None = None
    pull: torch.Tensor | None = None
    misfit: float | None = None

    def residual(self, w: torch.Tensor) -> float | None:
        """‖R‖² = ‖(X − X̃)·Wᵀ‖² = tr(W·gap·Wᵀ) for the layer's float weights (None without ``gap``)."""
        if self.pull is not None:
            return self.misfit
        return None if self.gap is None else _dot(w @ self.gap.float(), w)

    def pulled(self, w: torch.Tensor, h: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
        """W·(C − H) [out, in] in the column order ``perm``, from W and H already in that order."""
        if self.pull is not None:
            return self.pull.float()[:, perm]
        return w @ (self.cross.float()[perm][:, perm] - h)

    def shift(self, pull: torch.Tensor, u: torch.Tensor, ridge: float, residual: float | None) -> torch.Tensor:
        """f·Δ = f·W·(C − H)·H⁻¹ from ``pull`` = W·(C − H) and U, both in the loop's column
        order, with H + ridge·I = (UᵀU)⁻¹."""
        half = pull @ u.T  # W·(C − H)·Uᵀ
        delta = half @ u
        self.moved = self.toward
        if residual:  # (no gap: X̃ = X, and Δ = 0)
            along = _dot(half, half)  # tr(Δ·W·(C − H)ᵀ): ‖R‖² falls by 2·along − size
            ridged = ridge * _dot(delta, delta)
            size = along - ridged  # ‖X̃·Δᵀ‖² = tr(Δ·H·Δᵀ)
            k = u.shape[0] - ridge * _dot(u, u)  # tr(H·(H + λI)⁻¹)
            n = self.tokens
            if n - k - 1 <= 0 or size <= 0:
                self.moved = 0.0
            else:
                sigma2 = max(residual - along - ridged, 0.0) / (n - k)
                noise = sigma2 * k * n / (n - k - 1)
                self.moved = self.toward * max(0.0, 1.0 - noise / size)
        return delta.mul_(self.moved)


def _dot(a: torch.Tensor, b: torch.Tensor) -> float:
    """Σ a·b elementwise, with no copy of either (float32: the shrinkage needs no more)."""
    return float(torch.dot(a.reshape(-1), b.reshape(-1)))


def gptq_quantize(w: torch.Tensor, h: torch.Tensor, spec: QSpec, damp: float = 0.01,
                  act_order: bool = False, block: int = 128, refit: bool = True,
                  target: FloatTarget | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, dict]:
    """(codes, scale, zero point, dequantize attrs) for the [out, in] weight ``w`` given the
    input Hessian ``h`` [in, in]. The parameters follow ``spec`` as round-to-nearest would.
    The loop runs in float32, as the reference implementations do (twice the speed of float64
    on CPUs, with the same results to within rounding).

    A ``target`` moves the loop's target toward the float model's outputs (``FloatTarget``)."""
    w = w.detach().float()
    given, h = h, h.detach().float()
    cols = w.shape[1]
    dead = torch.diag(h) == 0  # an input the calibration never set: its column is dropped
    perm = torch.argsort(torch.where(dead, 1.0, torch.diag(h)), descending=True) if act_order else torch.arange(cols)
    # the target's sums on every column of W, before dead inputs are zeroed: the float outputs read them all
    residual = target.residual(w) if target is not None else None
    w, h, dead = w[:, perm], h[perm][:, perm], dead[perm]  # (copies: the caller's h is not changed)
    pull = target.pulled(w, h, perm) if target is not None else None
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    u, ridge = _inverse_cholesky(h, damp)
    del h
    if target is not None:
        w += target.shift(pull, u, ridge, residual)
        del pull
    original = w[:, torch.argsort(perm)].clone() if refit and not spec.dtype.is_float else None  # what the refit fits

    group = spec.group_size if spec.granularity == "group" else None
    fixed = _fixed_params(w, perm, spec, group, act_order)
    # the loop works on Wᵀ, so that a column of W is a contiguous row
    wt = w.T.contiguous()
    order = perm.tolist()
    scale_cols = torch.zeros_like(wt)  # per column: the scale and zero point it was rounded with
    zp_cols = torch.zeros_like(wt)
    current = None
    for i1 in range(0, cols, block):
        i2 = min(i1 + block, cols)
        w1, err1 = wt[i1:i2].clone(), torch.zeros(i2 - i1, wt.shape[1], dtype=wt.dtype)
        for i in range(i2 - i1):
            col = i1 + i
            if fixed is None and col % group == 0:  # a new group: scales from the updated weights
                current = _row_params(torch.cat([w1[i:], wt[i2:]], 0)[:group].T, spec)
            s, z = current if fixed is None else _fixed_column(fixed, order[col], group)
            q = (torch.clamp(torch.round(w1[i] / s) + z, *spec.qrange) - z) * s
            scale_cols[col], zp_cols[col] = s, z
            e = (w1[i] - q) / u[col, col]
            w1[i:].addr_(u[col, col:i2], e, alpha=-1)
            w1[i] = q
            err1[i] = e
        wt[i1:i2] = w1
        wt[i2:].addmm_(u[i1:i2, i2:].T, err1, alpha=-1)
    inv = torch.argsort(perm)
    wq, scale_cols = wt[inv].T, scale_cols[inv].T
    if original is not None:
        wq, scale_cols = refit_scales(original, wq, scale_cols, given, group or cols, damp)
    return _pack(wq, scale_cols, zp_cols[inv].T, spec, group)


def refit_scales(w: torch.Tensor, wq: torch.Tensor, scale_cols: torch.Tensor, h: torch.Tensor,
                 group: int, damp: float = 0.01, budget: int = 1 << 25) -> tuple[torch.Tensor, torch.Tensor]:
    """(Ŵ, per-column scales) with the codes of ``wq`` kept and each row's group scales
    solved for the least (w − Ŵ)·H·(w − Ŵ)ᵀ, H damped as the GPTQ loop damped it. ``wq`` and
    ``scale_cols`` are [out, in], the scale repeated over each group's columns. A row where a
    scale would come out non-positive keeps its old scales; a tiny ridge toward the old scales
    settles a group whose codes all sit at the zero point. Rows go in chunks of about
    ``budget`` floats."""
    rows, cols = w.shape
    groups = -(-cols // group)
    pad = groups * group - cols
    hd = h.detach().to(torch.float32, copy=True)
    dead = torch.diag(hd) == 0
    hd[dead, dead] = 1.0
    hd.diagonal().add_(damp * float(torch.diag(hd).double().mean()))
    hv = torch.nn.functional.pad(hd, (0, pad)).reshape(cols, groups, group)  # H[i, (k, c)]
    del hd
    old = scale_cols[:, ::group]
    d = torch.nn.functional.pad(torch.round(wq / scale_cols), (0, pad)).reshape(rows, groups, group)
    new = torch.empty_like(old)
    eye = torch.eye(groups)
    step = max(1, budget // (cols * groups))
    for r0 in range(0, rows, step):
        dc = d[r0:r0 + step]
        hdc = torch.einsum("ikc,rkc->rik", hv, dc)  # (H·D)[r, i, k]
        per_group = torch.nn.functional.pad(hdc, (0, 0, 0, pad)).reshape(-1, groups, group, groups)
        a = torch.einsum("rgc,rgck->rgk", dc, per_group)  # DᵀHD per row
        b = torch.einsum("rik,ri->rk", hdc, w[r0:r0 + step])
        ridge = 1e-6 * a.diagonal(dim1=1, dim2=2).amax(1).clamp_min(1e-30)[:, None, None] * eye
        sol, info = torch.linalg.solve_ex(a + ridge, (b + ridge[:, 0, 0, None] * old[r0:r0 + step])[..., None])
        sol = sol[..., 0]
        fine = ((info == 0)[:, None] & (sol > 0) & torch.isfinite(sol)).all(1, keepdim=True)
        new[r0:r0 + step] = torch.where(fine, sol, old[r0:r0 + step])
    scale = new.repeat_interleave(group, 1)[:, :cols]
    return d.reshape(rows, -1)[:, :cols] * scale, scale


def _inverse_cholesky(h: torch.Tensor, damp: float) -> tuple[torch.Tensor, float]:
    """U, the upper Cholesky factor of (H + λ·mean(diag H)·I)⁻¹, in float32: with J the
    reversal, J·H·J = M·Mᵀ gives H⁻¹ = Uᵀ·U for U = J·M⁻¹·J (one factorization and one
    triangular inverse, not three factorizations). λ grows tenfold while the damped H is not
    positive definite in float32. Returns U and the ridge λ·mean(diag H) that was added."""
    mean = float(torch.diag(h).double().mean())
    for _ in range(6):
        flipped = h.flip(0, 1)
        flipped.diagonal().add_(damp * mean)
        m, info = torch.linalg.cholesky_ex(flipped)
        del flipped
        if int(info) == 0:
            eye = torch.eye(h.shape[0], dtype=h.dtype)
            return torch.linalg.solve_triangular(m, eye, upper=False).flip(0, 1), damp * mean
        damp *= 10
    raise ValueError("GPTQ: the layer's input Hessian is not positive definite even with heavy damping")


def _row_params(w: torch.Tensor, spec: QSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row (scale, zero point) of ``w``; zero point 0 when symmetric."""
    scale, zp, _ = weight_qparams(w.float(), QSpec(spec.dtype, "channel", None, spec.symmetric,
                                                   observer=spec.observer))
    return scale.float(), (zp.float() if zp is not None else torch.zeros_like(scale.float()))


def _fixed_params(w, perm, spec, group, act_order):
    """Parameters fixed before the loop: per channel always; per group under act_order
    (from the original weights, in the original column order)."""
    if group is None:
        return _row_params(w, spec)
    if not act_order:
        return None
    original = w[:, torch.argsort(perm)].float()
    scale, zp, _ = weight_qparams(original, spec)  # [rows, groups]; the loop reads a group's as a row
    zp = zp.float() if zp is not None else torch.zeros_like(scale.float())
    return scale.float().T.contiguous(), zp.T.contiguous()


def _fixed_column(fixed, original_col: int, group: int | None):
    scale, zp = fixed
    if group is None:
        return scale, zp
    return scale[original_col // group], zp[original_col // group]


def _pack(wq, scale_cols, zp_cols, spec, group):
    """Integer codes and compact scales from the per-column parameters used in the loop."""
    if group is None:
        scale, zp = scale_cols[:, 0], zp_cols[:, 0]
        attrs = {"axis": 0}
    else:
        scale, zp = scale_cols[:, ::group], zp_cols[:, ::group]
        attrs = {"axis": 1, "group_size": group}
    scale = scale.clone(memory_format=torch.contiguous_format)  # not a view: it would hold all of scale_cols
    zp_t = None if spec.symmetric else zp.round().to(spec.dtype.storage)
    q = apply_qparams(wq, scale, zp_t, spec, attrs)
    rows = slice(None, None, max(1, wq.shape[0] // 64))  # the codes reproduce the loop's weights (a sample of rows)
    assert torch.allclose(dequantize_codes(q[rows], scale[rows], None if zp_t is None else zp_t[rows], attrs), wq[rows],
                          atol=1e-4 * float(scale.max()) + 1e-6)
    return q, scale, zp_t, attrs
