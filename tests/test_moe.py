"""Mixture-of-experts layers: the experts' stacked weights (transformers' grouped matmuls) are
quantized per expert like linear layers, by rounding to nearest or by GPTQ on each expert's
routed rows, and the quantized model runs in ONNX Runtime and saves and loads."""

import pytest
import torch

import lowbit
from conftest import rel_err
from lowbit.quant.experts import GROUPED_MM, RoutedRows, gptq_experts, round_experts
from lowbit.quant.spec import parse_qspec
from lowbit.quant.weights import dequantize_codes, fake_quantize

pytest.importorskip("transformers")
from lowbit.families import build_model, make_inputs  # noqa: E402


def _calibration(model):
    return [make_inputs(model, "ids", b, n, seed=i) for i, (b, n) in enumerate([(2, 7), (1, 12), (3, 20)])]


def _experts(q):
    """(grouped matmul, its weight's dequantize node) for every MoE layer of the compiled model."""
    out = []
    for node in q.graph.nodes:
        if node.op in GROUPED_MM:
            out.append((node, node.operand(1).producer))
    return out


@pytest.fixture(scope="module")
def qwen3_moe():
    model = build_model("qwen3-moe")
    return model, _calibration(model)


def test_experts_are_stored_as_int4_codes_per_expert(qwen3_moe):
    model, calibration = qwen3_moe
    w = {n: p.detach() for n, p in model.named_parameters()}
    q = lowbit.compile(model, calibration[0], recipe="w4a16-rtn", calibration=calibration, progress=False)
    experts = _experts(q)
    assert len(experts) == 2
    spec = parse_qspec("int4/group128/asym")
    for node, dq in experts:
        assert dq.op == "quant.dequantize" and dq.operand(0).tensor_type.dtype == spec.dtype
        codes = [q.graph.tensor(v) if v is not None else None for v in dq.operands]
        got = dequantize_codes(codes[0], codes[1], codes[2], dq.attrs)  # [experts, in, out]
        param = next(v for k, v in w.items() if k.startswith(node.loc.module) and v.shape[1:] == got.shape[1:][::-1])
        for e in range(param.shape[0]):  # each expert's [out, in] matrix, rounded as a linear's weight
            assert torch.allclose(got[e].T, fake_quantize(param[e].float(), spec), atol=1e-6)
    assert any("MoE expert weight" in n for n in q.traced.notes)


def test_gptq_experts_fit_their_rows_and_keep_an_expert_no_row_reached():
    torch.manual_seed(0)
    experts, cin, cout = 3, 64, 48
    w = torch.randn(experts, cin, cout)
    mix = torch.randn(cin, cin) / cin ** 0.5 + torch.eye(cin)  # correlated inputs: where GPTQ gains
    rows = [torch.randn(200, cin) @ mix, torch.randn(40, cin) @ mix, torch.zeros(0, cin)]  # the last: none routed
    x = torch.cat(rows)
    offsets = torch.tensor([200, 240, 240], dtype=torch.int32)
    spec = parse_qspec("int4/group32/asym")
    rounded, seen = gptq_experts(w, spec, lambda: [(x, offsets)])
    assert seen.tolist() == [200, 40, 0]
    gptq = dequantize_codes(rounded.q, rounded.scale, rounded.zp, rounded.attrs)
    rtn_r = round_experts(w, spec)
    rtn = dequantize_codes(rtn_r.q, rtn_r.scale, rtn_r.zp, rtn_r.attrs)
    for e in (0, 1):  # on its own rows, GPTQ's expert errs less than rounding to nearest
        assert (rows[e] @ (gptq[e] - w[e])).norm() < 0.9 * (rows[e] @ (rtn[e] - w[e])).norm()
    # the expert no row reached is rounded on the pooled rows' statistics, not zeroed
    assert rel_err(gptq[2], w[2]) < 2 * rel_err(rtn[2], w[2])


@pytest.mark.parametrize("recipe,bound", [("w4a16-gptq", 0.35), ("w8a8", 0.15)])
def test_quantized_moe_runs_in_onnx_runtime_and_saves(qwen3_moe, recipe, bound, tmp_path):
    pytest.importorskip("onnxruntime")
    import onnx

    from lowbit.backends.onnx import compare_with_torch

    model, calibration = qwen3_moe
    q = lowbit.compile(model, calibration[0], recipe=recipe, calibration=calibration, progress=False)
    if recipe.endswith("gptq"):  # 86 calibration tokens, top 2 of 4 experts: fewer rows than the 64 inputs
        assert any("MoE experts' GPTQ saw fewer calibration rows than their inputs" in n for n in q.traced.notes)
    test = make_inputs(model, "ids", 2, 15, seed=7)
    with torch.no_grad():
        assert rel_err(q(*test).logits, model(*test).logits) < bound
    path, _ = q.export_onnx(tmp_path / "m.onnx")
    kinds = {t.name: t.data_type for t in onnx.load(str(path), load_external_data=False).graph.initializer
             if "experts" in t.name and t.name.endswith("_q")}
    P = onnx.TensorProto
    want = {P.UINT4, P.INT4} if recipe.startswith("w4") else {P.UINT8, P.INT8}  # codes, not float weights
    assert len(kinds) == 2 and set(kinds.values()) <= want, kinds
    assert compare_with_torch(path, q, q.traced.flatten_inputs(test, {}))["cosine"] > 0.999
    q.save(tmp_path / "saved")
    assert torch.equal(lowbit.load(tmp_path / "saved")(*test).logits, q(*test).logits)


def test_a_moe_folder_in_the_hub_layout_compiles_from_its_files(qwen3_moe, tmp_path):
    """transformers saves stacked experts one matrix per expert and projection; a folder traced
    without loading its weights assembles each stacked parameter from those keys."""
    from safetensors import safe_open

    model, calibration = qwen3_moe
    model.save_pretrained(tmp_path)
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        assert "model.layers.0.mlp.experts.3.up_proj.weight" in f.keys()
    test = make_inputs(model, "ids", 2, 11, seed=4)
    with torch.no_grad():
        want = model(*test).logits
    fast = lowbit.compile(tmp_path, calibration[0], progress=False)
    assert rel_err(fast(*test).logits, want) < 1e-5
    q = lowbit.compile(tmp_path, recipe="w4a16-rtn", calibration=calibration, progress=False)
    assert len(_experts(q)) == 2 and rel_err(q(*test).logits, want) < 0.35


def test_experts_read_one_at_a_time_are_folded_into_linears_and_quantized():
    """JetMoE's experts index their stack (``W[i]``) once per expert: the selects partition the
    stack, so they fold into one constant per expert (named ``W.i``) and each is a linear the
    recipe quantizes, at any size."""
    import transformers as tf

    cfg = tf.JetMoeConfig(vocab_size=256, hidden_size=64, num_hidden_layers=1, num_attention_heads=4,
                          num_local_experts=4, num_experts_per_tok=2, kv_channels=16, intermediate_size=1100)
    torch.manual_seed(0)
    model = tf.JetMoeForCausalLM(cfg).eval()
    q = lowbit.compile(model, make_inputs(model, "ids", 2, 9), recipe="w4a16-rtn", calibration=_calibration(model),
                       progress=False)
    experts = [n for n in q.graph.nodes if n.op in ("core.linear", "quant.linear") and ".mlp." in n.loc.module
               and "router" not in n.loc.module]
    assert len(experts) == 8 and all(n.op == "quant.linear" for n in experts)
    assert "model.layers.0.mlp.input_linear.weight.3.q" in q.graph.tensors
    assert not any("computes from constants" in n for n in q.traced.notes)


def test_routed_rows_keep_each_expert_its_own_rows():
    routed = RoutedRows(3, max_rows=100, per_batch=100)
    x = torch.arange(14.0).reshape(7, 2) - 6
    offsets = torch.tensor([2, 2, 6], dtype=torch.int32)  # expert 1 gets none; row 6 is past the routed rows
    routed.feed("offsets", offsets)  # either order: the graph may compute the offsets first
    routed.feed("rows", x)
    routed.feed("rows", x[:3] * 10)
    routed.feed("offsets", torch.tensor([1, 3, 3], dtype=torch.int32))
    assert torch.equal(routed.rows(0), torch.cat([x[:2], x[:1] * 10]))
    assert routed.rows(1).shape == (2, 2) and torch.equal(routed.rows(1), x[1:3] * 10)
    assert torch.equal(routed.rows(2), x[2:6])
    assert torch.equal(routed.absmax[2], x[2:6].abs().amax(0)) and routed.absmax[0].tolist() == [60.0, 50.0]
    few = RoutedRows(2, max_rows=4, per_batch=2)
    few.feed("rows", torch.randn(8, 3))
    few.feed("offsets", torch.tensor([4, 8]))
    assert few.rows(0).shape[0] == 1 and few.rows(1).shape[0] == 1  # every 4th row: each expert its share


@pytest.mark.parametrize("pipeline", ["awq{clip=false}", "smooth-quant", "smooth-quant{alpha=auto}"])
def test_scales_fold_into_the_experts_without_changing_the_model(qwen3_moe, pipeline):
    """A norm's scale reaches the router and every expert through the routing's row gathers;
    after the up projection each expert gets its own. The model computes the same function."""
    model, calibration = qwen3_moe
    plain = lowbit.compile(model, calibration[0], progress=False)
    q = lowbit.compile(model, calibration[0], pipeline=pipeline, calibration=calibration, progress=False)
    name = pipeline.split("{")[0]
    experts = [n for n in q.graph.nodes if n.op in GROUPED_MM]
    assert len(experts) == 2 and all(name in n.loc.touched_by for n in experts)
    for node in experts:
        w, before = q.graph.tensor(node.operand(1)), plain.graph.tensor(node.operand(1))
        assert w.shape == before.shape and rel_err(w, before) > 0.01  # scaled, not left alone
    router = next(n for n in q.graph.nodes if n.op == "core.linear" and n.loc.module.endswith("mlp.gate"))
    assert name in router.loc.touched_by  # the router reads the same scaled norm output
    assert not any("get no scales" in n for n in q.traced.notes), q.traced.notes
    test = make_inputs(model, "ids", 2, 15, seed=7)
    with torch.no_grad():
        assert rel_err(q(*test).logits, model(*test).logits) < 1e-5


def test_expert_scales_lower_the_error_where_channels_have_outliers():
    """Real LMs' norm outputs carry a few large channels; folding scales into the experts (as into
    linears) is what keeps their rounding from being dominated by them."""
    torch.manual_seed(0)
    model = build_model("qwen3-moe")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("layernorm.weight"):
                p[[3, 17, 40]] *= 15.0
    calibration = _calibration(model)
    test = make_inputs(model, "ids", 2, 24, seed=99)
    with torch.no_grad():
        want = model(*test).logits
    errors = {}
    for pipeline in ["awq{weights=int4/group32/asym}", "awq{weights=int4/group32/asym,experts=false}",
                     "smooth-quant", "smooth-quant{experts=false}"]:
        wq = "int4/group32/asym" if pipeline.startswith("awq") else "int8/channel"
        acts = "none" if pipeline.startswith("awq") else "uint8/tensor/asym"
        q = lowbit.compile(model, calibration[0], pipeline=f"{pipeline},insert-qdq{{weights={wq},acts={acts}}}",
                           calibration=calibration, progress=False)
        errors[pipeline] = rel_err(q(*test).logits, want)
        if "experts=false" in pipeline:
            assert any("get no scales (experts=false)" in n for n in q.traced.notes)
    assert errors["awq{weights=int4/group32/asym}"] < 0.9 * errors["awq{weights=int4/group32/asym,experts=false}"], errors
    assert errors["smooth-quant"] < 0.9 * errors["smooth-quant{experts=false}"], errors


def test_an_expert_input_nothing_can_absorb_a_scale_into_is_named():
    """GPT-OSS clamps its experts' up projection (and adds a bias): its down projections get no
    scale, and the notes say which."""
    model = build_model("gpt-oss")
    calibration = _calibration(model)
    q = lowbit.compile(model, calibration[0], recipe="w4a16", calibration=calibration, progress=False)
    assert any(n.startswith("awq: 2 MoE expert weight tensor(s) (model.layers.0.mlp.experts … model.layers.1.mlp."
                            "experts) get no scales") for n in q.traced.notes), q.traced.notes
    assert all(dq.op == "quant.dequantize" for _, dq in _experts(q))


def test_a_weight_override_reaches_the_experts(qwen3_moe):
    model, calibration = qwen3_moe
    q = lowbit.compile(model, calibration[0], pipeline="insert-qdq{weights=int4/group32/sym,"
                       "weights_override=*.experts>int8/channel}", calibration=calibration, progress=False)
    codes = [dq.operand(0) for _, dq in _experts(q)]
    assert [str(c.tensor_type.dtype) for c in codes] == ["DType.i8"] * 2
    assert max(int(q.graph.tensor(c).abs().max()) for c in codes) > 7  # int8 codes, not int4 ones


@pytest.mark.parametrize("recipe,ratio", [("w4a16", 0.97), ("w8a8-static", 0.7)])
def test_expert_scales_bring_a_trained_moe_closer_to_fp32(recipe, ratio):
    """On the shipped byte-level mixture of experts (trained, 8 experts, 2 per token), the
    recipe's KL divergence from fp32 on held-out text, with its scaling pass folding scales
    into the experts and told not to (``experts=false``). Measured on the full windows by
    ``benchmarks/moe_scales.py``: AWQ 8.82e-3 against 9.90e-3, static SmoothQuant 1.12e-3
    against 2.55e-3."""
    from lowbit.evaluate import byte_windows, next_token_scores, reference_logprobs
    from lowbit.recipes import recipe_pipeline
    from lowbit.zoo import load_model

    spec = load_model("byte-moe")
    calibration, evals = byte_windows("calib")[:2], byte_windows("val")[:4]
    reference = reference_logprobs(spec.model, evals)
    pipeline = recipe_pipeline(recipe)
    kl = []
    for text in (pipeline, pipeline.replace("awq{", "awq{experts=false,").replace("smooth-quant{",
                                                                                    "smooth-quant{experts=false,")):
        q = lowbit.compile(spec.model, spec.example_inputs, dynamic_shapes=spec.dynamic_shapes, pipeline=text,
                           calibration=calibration, progress=False)
        kl.append(next_token_scores(q, evals, reference)["kl"])
    assert kl[0] < ratio * kl[1], kl


@pytest.mark.parametrize("family, fused", [("phi3", "mlp.down_proj"), ("jetmoe", "mlp.input_linear")])
def test_scales_reach_fused_up_projections_and_experts_on_split_rows(family, fused):
    """Phi-3's down projection reads a piece of its fused gate_up projection, whose rows for
    that piece absorb the scale; JetMoE's experts are linears on the routed rows split per
    expert, which the norm's scale reaches as the router does. The model computes the same
    function, and the linears left unscaled are named."""
    model = build_model(family)
    calibration = [make_inputs(model, "ids", 2, n, seed=n) for n in (7, 12)]
    plain = lowbit.compile(model, calibration[0], progress=False)
    q = lowbit.compile(model, calibration[0], pipeline="smooth-quant", calibration=calibration, progress=False)
    reached = [n for n in q.graph.nodes if n.op == "core.linear" and n.loc.module.endswith(fused)]
    assert reached and all("smooth-quant" in n.loc.touched_by for n in reached)
    moved = [rel_err(q.graph.tensor(n.operand(1)), plain.graph.tensor(m.operand(1))) for n, m in
             zip(reached, [m for m in plain.graph.nodes if m.op == "core.linear" and m.loc.module.endswith(fused)])]
    assert min(moved) > 0.01
    said = [n for n in q.traced.notes if "linear layer(s) are not scaled" in n]
    assert said and "lm_head" not in said[0], q.traced.notes
    test = make_inputs(model, "ids", 2, 15, seed=7)
    with torch.no_grad():
        assert rel_err(q(*test).logits, model(*test).logits) < 1e-5
