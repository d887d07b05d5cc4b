"""Weight rounding (GPTQ, AWQ), fp8, and the reparameterization passes (RepQ-ViT,
cross-layer equalization)."""

import pytest
import torch

from lowbit import zoo
from lowbit.api import build
from lowbit.ir import parse_graph, run_graph, verify
from lowbit.passes import PassContext, parse_pipeline
from lowbit.passes.awq import search_clip, search_scale
from lowbit.quant.gptq import FloatTarget, gptq_quantize
from lowbit.quant.spec import parse_qspec
from lowbit.quant.weights import dequantize_codes, fake_quantize


def _correlated(n: int, d: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    mix = torch.randn(16, d, generator=torch.Generator().manual_seed(99))
    return torch.randn(n, 16, generator=gen) @ mix + 0.05 * torch.randn(n, d, generator=gen)


def _out_err(w_hat, w, x):
    return ((x @ (w - w_hat).T).norm() / (x @ w.T).norm()).item()


@pytest.mark.parametrize("spec_text", ["int4/channel", "int4/group16/asym", "int8/channel"])
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_beats_round_to_nearest(spec_text, act_order):
    spec = parse_qspec(spec_text)
    w = torch.randn(32, 64, generator=torch.Generator().manual_seed(0))
    x = _correlated(1024, 64, 1)
    q, scale, zp, attrs = gptq_quantize(w, x.T.double() @ x.double(), spec, act_order=act_order)
    lo, hi = spec.qrange
    assert q.min() >= lo and q.max() <= hi
    held_out = _correlated(512, 64, 2)
    gptq = _out_err(dequantize_codes(q, scale, zp, attrs), w, held_out)
    rtn = _out_err(fake_quantize(w, spec), w, held_out)
    assert gptq < 0.7 * rtn, (gptq, rtn)


@pytest.mark.parametrize("spec_text", ["int4/channel", "int4/group16/asym", "int4/group24/asym", "int8/channel"])
def test_gptq_refit_solves_the_scales_for_the_codes(spec_text):
    """With the codes fixed, the refit scales give a lower Hessian-weighted error than the
    scales GPTQ rounded with (the same codes and zero points), and the output error on held-out
    inputs drops with it. group24 leaves a short last group of 16 (64 = 2·24 + 16)."""
    spec = parse_qspec(spec_text)
    w = torch.randn(32, 64, generator=torch.Generator().manual_seed(0))
    x = _correlated(1024, 64, 1) * torch.linspace(0.2, 3.0, 64)
    h = x.T.double() @ x.double()
    before = gptq_quantize(w, h, spec, act_order=True, refit=False)
    after = gptq_quantize(w, h, spec, act_order=True)
    assert torch.equal(before[0], after[0])  # the same codes
    assert (before[2] is None) == (after[2] is None) and (before[2] is None or torch.equal(before[2], after[2]))
    assert not torch.allclose(before[1], after[1])  # the scales moved
    assert after[1].shape == before[1].shape and bool((after[1] > 0).all())
    hd = h.float() + 0.01 * float(torch.diag(h).mean()) * torch.eye(64)
    err = lambda r: float(torch.einsum("ri,ij,rj->", w - dequantize_codes(*r[:3], r[3]), hd,
                                       w - dequantize_codes(*r[:3], r[3])))
    assert err(after) < 0.995 * err(before), (err(after), err(before))
    held_out = _correlated(512, 64, 2) * torch.linspace(0.2, 3.0, 64)
    assert _out_err(dequantize_codes(*after[:3], after[3]), w, held_out) < \
        _out_err(dequantize_codes(*before[:3], before[3]), w, held_out)


@pytest.mark.parametrize("spec_text", ["int4/channel", "int4/group16/asym"])
def test_gptq_toward_the_float_outputs(spec_text):
    """The quantized model's inputs X̃ differ from the float model's X by a fixed distortion (what
    rounded layers before leave): with C = XᵀX̃, GPTQ's target moves toward the float outputs and
    the error ‖X̃·Ŵᵀ − X·Wᵀ‖ on held-out pairs drops; at t = 0, or when X̃ = X, the codes are GPTQ's own."""
    spec = parse_qspec(spec_text)
    w = torch.randn(32, 64, generator=torch.Generator().manual_seed(0))
    distort = torch.eye(64) + 0.05 * torch.randn(64, 64, generator=torch.Generator().manual_seed(3))
    x = _correlated(2048, 64, 1)
    xq = x @ distort
    h, c = xq.T.double() @ xq.double(), x.T.double() @ xq.double()
    plain = gptq_quantize(w, h, spec, act_order=True)
    unmoved = gptq_quantize(w, h, spec, act_order=True, target=FloatTarget(c, toward=0.0))
    assert torch.equal(plain[0], unmoved[0]) and torch.equal(plain[1], unmoved[1])
    same = gptq_quantize(w, x.T.double() @ x.double(), spec, act_order=True, target=FloatTarget(x.T.double() @ x.double()))
    assert torch.equal(same[0], gptq_quantize(w, x.T.double() @ x.double(), spec, act_order=True)[0])
    held, held_q = _correlated(1024, 64, 2), _correlated(1024, 64, 2) @ distort
    err = lambda r: ((held_q @ dequantize_codes(*r[:3], r[3]).T - held @ w.T).norm() / (held @ w.T).norm()).item()
    half, full = (gptq_quantize(w, h, spec, act_order=True, target=FloatTarget(c, toward=t)) for t in (0.5, 1.0))
    assert err(half) < 0.9 * err(plain) and err(full) < err(half), (err(plain), err(half), err(full))
    # the distortion is exactly linear: the move is no noise, and the shrinkage keeps all of it
    e = (x - xq).double()
    kept = FloatTarget(c, toward=0.5, gap=e.T @ e, tokens=x.shape[0])
    gptq_quantize(w, h, spec, act_order=True, target=kept)
    assert kept.moved > 0.49, kept.moved


@pytest.mark.parametrize("chunk", [None, 250])
def test_float_target_sums_per_layer_equal_the_sums_per_input(monkeypatch, chunk):
    """The float target's sums are taken per layer where the layers reading an input have no
    more outputs in all than it has features, per input otherwise (``per_layer_sums``). Both give
    the same W·(C − H), ‖(X − X̃)·Wᵀ‖² and move for each layer, with an input the quantized model
    never sets (diag H = 0) counted in both, whether the batches' rows are gathered into one
    product or taken a batch at a time; per layer, W·(C − H) is summed as Rᵀ·X̃ without the
    cancellation of C − H, to 1e-5 of its scale rather than 1e-3."""
    import lowbit.passes.quantize as quantize

    if chunk:
        monkeypatch.setattr(quantize, "GRAM_ROWS", chunk)
    x = _correlated(600, 64, 1)
    xq = x @ (torch.eye(64) + 0.05 * torch.randn(64, 64, generator=torch.Generator().manual_seed(3)))
    xq[:, 5] = 0.0  # a dead input in the quantized model, alive in the float one
    batches = lambda t: [t[i:i + 200].reshape(2, 100, 64) for i in range(0, 600, 200)]
    ws = [torch.randn(n, 64, generator=torch.Generator().manual_seed(n)) for n in (24, 16)]
    g = parse_graph("""graph @main(%x: f32[batch,64]) {
  %w1 = core.constant() {name="a.weight"} : f32[24,64]  @a
  %w2 = core.constant() {name="b.weight"} : f32[80,64]  @b
  %y1 = core.linear(%x, %w1, none) : f32[batch,24]  @a
  %y2 = core.linear(%x, %w2, none) : f32[batch,80]  @b
  return %y1, %y2
}""")
    a, b = [n for n in g.nodes if n.op == "core.linear"]
    assert quantize.per_layer_sums([a]) and not quantize.per_layer_sums([a, b])  # 24 ≤ 64 < 24 + 80
    h, layers = quantize._hessian(batches(xq), batches(x), [24, 16], torch.cat(ws))
    h_in, shared = quantize._hessian(batches(xq), batches(x), [24, 16])
    assert all(t.pull is not None and t.cross is None for t in layers)
    assert shared[0].cross is not None and shared[0] is shared[1]
    full = xq.T.double() @ xq.double()
    torch.testing.assert_close(h, full, rtol=1e-4, atol=1e-5 * float(full.abs().max()))
    torch.testing.assert_close(h_in, h)
    assert quantize._hessian(iter([]), iter([]), [24]) == (None, None)  # no real token
    spec = parse_qspec("int4/group16/asym")
    for w, layer in zip(ws, layers, strict=True):
        exact = ((x - xq).double() @ w.double().T).T @ xq.double()  # W·(C − H) = Rᵀ·X̃
        scale = float(exact.abs().max())
        order = torch.arange(64)
        pull, misfit = layer.pulled(w, h.float(), order), layer.residual(w)
        pull_in, misfit_in = shared[0].pulled(w, h.float(), order), shared[0].residual(w)
        torch.testing.assert_close(pull.double(), exact, rtol=0, atol=1e-5 * scale)
        torch.testing.assert_close(pull_in.double(), exact, rtol=0, atol=1e-3 * scale)  # C − H cancels
        assert misfit == pytest.approx(float(((x - xq) @ w.T).square().sum()), rel=1e-4)
        assert misfit_in == pytest.approx(misfit, rel=1e-4)
        results = []
        for target in (layer, shared[0]):
            target.toward = 0.5
            results.append((gptq_quantize(w, h, spec, act_order=True, target=target), target.moved))
        (q, moved), (q_in, moved_in) = results
        assert moved == pytest.approx(moved_in, rel=1e-3) and 0.4 < moved <= 0.5
        assert (q[0] == q_in[0]).float().mean() > 0.99
        assert not torch.equal(q[0], gptq_quantize(w, h, spec, act_order=True)[0])  # the move changed the codes


def test_float_target_shrinks_what_is_noise():
    """The move toward the float outputs is a regression of (X − X̃)·Wᵀ on X̃, shrunk by how much
    of it is noise. When X̃ carries no information on X − X̃ (X = X̃ + independent noise) all of it
    is noise: unshrunk, fitted on 80 tokens of 64 features, it makes held-out error worse than
    plain GPTQ, and shrunk it is dropped. When X̃ = X + independent noise (activation rounding)
    the move is real: shrunk, it is kept whole on 8192 tokens and partly on 80, beating plain GPTQ."""
    spec = parse_qspec("int4/group16/asym")
    w = torch.randn(32, 64, generator=torch.Generator().manual_seed(0))
    noise = lambda x, seed: 0.5 * torch.randn(x.shape, generator=torch.Generator().manual_seed(seed))
    for informative in (False, True):
        a = _correlated(4096, 64, 7)
        held, held_q = (a, a + noise(a, 8)) if informative else (a + noise(a, 8), a)
        err = lambda r: ((held_q @ dequantize_codes(*r[:3], r[3]).T - held @ w.T).norm() / (held @ w.T).norm()).item()
        for n in (80, 8192):
            a = _correlated(n, 64, 1)
            x, xq = (a, a + noise(a, 11)) if informative else (a + noise(a, 11), a)
            h, c, e = xq.T.double() @ xq.double(), x.T.double() @ xq.double(), (x - xq).double()
            plain = err(gptq_quantize(w, h, spec, act_order=True))
            whole = err(gptq_quantize(w, h, spec, act_order=True, target=FloatTarget(c, toward=1.0)))
            target = FloatTarget(c, toward=1.0, gap=e.T @ e, tokens=n)
            shrunk = err(gptq_quantize(w, h, spec, act_order=True, target=target))
            seen = (informative, n, plain, whole, shrunk, target.moved)
            if not informative:
                assert target.moved < 0.1 and shrunk < 1.01 * plain, seen
                assert n > 80 or whole > 1.05 * plain, seen
            elif n == 80:
                assert 0.1 < target.moved < 0.9 and shrunk < 0.95 * plain, seen
            else:
                assert target.moved > 0.95 and shrunk < 0.7 * plain, seen


def test_awq_scale_and_clip_search_reduce_error():
    spec = parse_qspec("int4/group16/asym")
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(512, 64, generator=gen) * torch.linspace(0.05, 4.0, 64)  # salient channels
    w = torch.randn(32, 64, generator=gen)
    s = search_scale(x, [w], spec, grid=20)
    scaled = _out_err(fake_quantize(w * s, spec) / s, w, x)
    rtn = _out_err(fake_quantize(w, spec), w, x)
    assert scaled < rtn
    clipped = search_clip(w, x, spec)
    assert _out_err(fake_quantize(clipped, spec), w, x) <= rtn + 1e-6


def test_fp8_weights_and_activations():
    g = parse_graph("""graph @main(%x: f32[batch,16]) {
  %w = core.constant() {name="fc.weight"} : f32[8,16]  @fc
  %h = core.linear(%x, %w, none) : f32[batch,8]  @fc
  return %h
}""")
    x = torch.randn(4, 16)
    ref = run_graph(g, [x])[0]
    parse_pipeline("insert-qdq{weights=fp8/channel,acts=fp8/tensor,head=true}")[0].run(
        g, PassContext(calibration=[[torch.randn(64, 16)]], progress=False))
    verify(g)
    assert any(n.op == "core.constant" and n.result.tensor_type.dtype.short == "f8e4m3" for n in g.nodes)
    err = ((run_graph(g, [x])[0] - ref).norm() / ref.norm()).item()
    assert 0 < err < 0.1


def test_repq_reparam_vit_lossless_and_one_quantizer_per_layernorm():
    spec = zoo.tiny_vit()
    traced, records = build(spec.model, spec.example_inputs, dynamic_shapes=spec.dynamic_shapes,
                            pipeline="repq-reparam,insert-qdq{weights=int8/channel,acts=uint8/tensor/asym}",
                            calibration=[spec.example_inputs], progress=False)
    repq = next(r for r in records if r.name == "repq-reparam")
    assert repq.changed and repq.drift < 1e-4
    norms = [n for n in traced.graph.nodes if n.op == "core.layer_norm"]
    fed = [n for n in norms if any(u.op == "quant.quantize" for u in n.result.users)]
    assert len(fed) >= 4  # two per block feed linears; the final norm feeds the pooler's slice
    for n in fed:
        (q,) = n.result.users
        assert q.op == "quant.quantize" and traced.graph.tensor(q.operand(1)).numel() == 1


def test_equalize_cross_layer_cnn_is_lossless_and_equalizes():
    spec = zoo.tiny_cnn()
    traced, records = build(spec.model, spec.example_inputs, dynamic_shapes=spec.dynamic_shapes,
                            pipeline="equalize-cross-layer", progress=False)
    assert records[-1].changed and records[-1].drift < 1e-4
    convs = [n for n in traced.graph.nodes if n.op == "core.conv2d"]
    w1, w2 = (traced.graph.tensor(c.operand(1)) for c in convs[:2])
    r1 = w1.abs().flatten(1).amax(1)
    r2 = w2.abs().transpose(0, 1).flatten(1).amax(1)
    assert torch.allclose(r1, r2, rtol=1e-4)


@pytest.mark.parametrize("recipe", ["w4a16", "w4a16-gptq", "w4a8", "fp8", "w8a8-dynamic"])
def test_recipes_run_on_llama(recipe):
    spec = zoo.tiny_llama()
    traced, records = build(spec.model, spec.example_inputs, dynamic_shapes=spec.dynamic_shapes,
                            recipe=recipe, calibration=[spec.example_inputs], progress=False)
    assert 0 < records[-1].drift < 0.3
    if recipe.startswith("w4"):  # hidden 64, MLP 128: a group of 128 spans each row: per channel
        g = traced.graph
        deq = [n for n in g.nodes if n.op == "quant.dequantize" and g.is_constant(n.operand(0))]
        assert deq and all(n.attrs.get("group_size") is None and n.attrs.get("axis") == 0 for n in deq)


def test_gptq_runs_when_activations_are_quantized_too():
    """The Hessians are keyed to each linear before QDQ is inserted on its input."""
    spec = zoo.tiny_llama()
    weights = {}
    for rounding in ("rtn", "gptq"):
        traced, _ = build(spec.model, spec.example_inputs, dynamic_shapes=spec.dynamic_shapes,
                          pipeline=f"insert-qdq{{weights=int4/channel,acts=int8/token/dynamic,rounding={rounding}}}",
                          calibration=[spec.example_inputs], progress=False, measure_drift=False)
        g = traced.graph
        weights[rounding] = [g.tensors[str(n.operand(0).producer.attrs["name"])] for n in g.nodes
                             if n.op == "quant.dequantize" and g.is_constant(n.operand(0))]
    assert len(weights["gptq"]) == len(weights["rtn"]) > 0
    assert sum(not torch.equal(a, b) for a, b in zip(weights["rtn"], weights["gptq"])) == len(weights["rtn"])
