"""The coverage matrix (``lowbit.families``): every architecture, built from a small config with
every other setting at its default, compiles equal to eager, quantizes with calibration batches
of three lengths, rotates, exports to ONNX Runtime and runs on the triton backend."""

from pathlib import Path

import pytest

from lowbit.families import CELLS, ENCODER_DECODER, FAMILIES, run_family

DOC = Path(__file__).parent.parent / "docs" / "models.md"


def test_the_matrix_covers_the_families_users_hold():
    kinds = [f.inputs for f in FAMILIES.values()]
    assert len(FAMILIES) >= 20
    assert kinds.count("ids") >= 12 and kinds.count("tokens") >= 5 and kinds.count("image") >= 5
    assert {"audio", "waveform", "seq2seq", "audio-seq2seq"} <= set(kinds)
    assert all(f"| {name} |" in DOC.read_text() for name in FAMILIES), "regenerate docs/models.md"


@pytest.mark.parametrize("name", list(FAMILIES))
def test_family(name, tmp_path):
    cells = run_family(name, tmp_path)
    assert list(cells) == list(CELLS)
    failed = {c: v.text for c, v in cells.items() if v.status == "fail"}
    assert not failed, f"{name}: {failed}"
    for cell, v in cells.items():  # a note is only what a pass said it could not do
        if v.status == "note":
            rotation_said = cell == "rotation" and ("fuse-norms" in v.text or "rotate-residual" in v.text)
            stateful = cell == "generate" and "no attention layer" in v.text  # Mamba-2: no key/value to quantize
            encoder_decoder = cell == "generate" and v.text == ENCODER_DECODER and FAMILIES[name].inputs.endswith("seq2seq")
            assert rotation_said or stateful or encoder_decoder or "no linear layer" in v.text, v.text  # a CNN
            # has no Triton kernel


@pytest.mark.parametrize("name", ["gemma2", "deberta-v2", "vit"])
def test_quantized_family_runs_in_half_precision(name):
    """``w8a8`` compiled in fp32, then ``.half()``: gemma2's quantized output head dequantizes to
    fp16 (its softcapping after it meets no fp16 operand that would cast it), deberta-v2's
    masked_fill with float32's minimum fills with float16's, ViT reads fp16 pixels."""
    import torch

    from lowbit.families import FAMILIES, _call, _Run, _tensors, build_model, relative_error

    run = _Run(name, FAMILIES[name], build_model(name), Path("."))
    compiled = run.compile(from_model=True, recipe="w8a8", calibration=run.calibration())
    inputs = run.fourth()
    want = _tensors(_call(compiled, inputs))
    compiled.half()
    half = {k: v.half() if v.is_floating_point() else v for k, v in inputs.items()} \
        if isinstance(inputs, dict) else tuple(v.half() if v.is_floating_point() else v for v in inputs)
    got = _tensors(_call(compiled, half))
    floats = [t for t in got if t.is_floating_point()]
    assert floats and all(t.dtype == torch.float16 and t.isfinite().all() for t in floats)
    assert relative_error([t.float() for t in got], want) < 0.05
