"""Models larger than memory: weights read from a model folder's safetensors files when used,
calibration swept block by block over all batches (spilling the boundary values to disk when
large), GPTQ in one sweep, and resuming an interrupted GPTQ from its work folder."""

import json
import math

import pytest
import torch
import transformers as tf

import lowbit
import lowbit.ir.store as store_mod
import lowbit.quant.calibrate as calibrate_mod
from lowbit import zoo
from lowbit.errors import LowbitError
from lowbit.evaluate import byte_windows, perplexity
from lowbit.frontend.weights import weightless_model
from lowbit.ir.store import LazyTensor, WeightFileError, lazy_safetensors
from lowbit.quant.calibrate import CalibrationError, calibrate
from lowbit.quant.observers import TensorStats


class _Interrupted(BaseException):
    """Stands for Ctrl-C (pytest keeps a real KeyboardInterrupt for itself)."""


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A small Llama (hidden 96: not a power of two) saved in several safetensors shards."""
    config = tf.LlamaConfig(hidden_size=96, intermediate_size=200, num_hidden_layers=3, num_attention_heads=4,
                            num_key_value_heads=2, vocab_size=300, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = tf.LlamaForCausalLM(config).eval()
    path = tmp_path_factory.mktemp("llama")
    model.save_pretrained(path, max_shard_size="100KB")
    return path, model


def _batches(n=4, length=24):
    return [(torch.randint(0, 300, (2, length), generator=torch.Generator().manual_seed(i)),) for i in range(n)]


@pytest.mark.parametrize("recipe", ["w4a16-gptq", "w8a8"])
def test_a_model_folder_compiles_as_the_loaded_model_does(folder, recipe, monkeypatch):
    """Traced from the folder without loading it, the result equals compiling the loaded model
    (bit for bit); the float weights left are still in the folder's files, and what the passes
    wrote (codes, SmoothQuant's scaled weights) went to temporary files."""
    monkeypatch.setattr(store_mod, "OFFLOAD_MIN_ELEMENTS", 4096)  # this model's layers are small
    path, model = folder
    batches = _batches()
    loaded = lowbit.compile(model, batches[0], recipe=recipe, calibration=batches, progress=False)
    lazy = lowbit.compile(str(path), recipe=recipe, calibration=batches, progress=False)
    x = torch.randint(0, 300, (1, 17))
    assert torch.equal(loaded(x).logits, lazy(x).logits)
    store = lazy.traced.graph.tensors
    embedding = store.raw("model.embed_tokens.weight")
    assert isinstance(embedding, LazyTensor) and str(path) in embedding.path
    codes = [n for n in store if n.endswith(".q") and store.nbytes(n) >= 4096]
    assert codes and all(store.is_lazy(n) and "lowbit-offload-" in store.raw(n).path for n in codes)
    assert any("read from the model's safetensors files" in n for n in lazy.traced.notes)
    # the module keeps what is in files there (int4 layers hold only their packed form)
    assert lazy._lazy and not any(store.is_lazy(n) for n in lazy._buffer_names)
    int4 = [m for m in lazy.cpu_kernels.values() if m.kernel == "int4pack_mm"]
    assert all(m.weight_q is None for m in int4) and (recipe != "w4a16-gptq" or int4)
    prompt = x[:, :5]
    assert torch.equal(loaded.generate(prompt, max_new_tokens=4), lazy.generate(prompt, max_new_tokens=4))


def test_a_weightless_model_is_never_loaded_whole(folder, monkeypatch):
    """Calibrating reads each weight once for all batches (the sweep goes block by block), and
    a plain run reads each once too."""
    path, _ = folder
    reads = []
    original = LazyTensor.load
    monkeypatch.setattr(LazyTensor, "load", lambda self: reads.append((self.path, self.offset)) or original(self))
    traced = lowbit.trace(weightless_model(path), _batches()[0], canonicalize=False)
    linears = [n for n in traced.graph.nodes if n.op == "core.linear"]
    reads.clear()
    batches = [traced.flatten_inputs(b) for b in _batches(6)]
    calibrate(traced.graph, batches, [n.operand(0) for n in linears], progress=False)
    lazy = sum(traced.graph.tensors.is_lazy(n) for n in traced.graph.tensors)
    assert 0 < len(reads) <= lazy and len(set(reads)) == len(reads)


def test_the_sweep_gives_the_statistics_of_batch_by_batch_runs(monkeypatch):
    """calibrate() over all batches together, with the boundary values in memory or spilled to
    disk, observes exactly what running each batch alone does."""
    from lowbit.ir.interpreter import Executor

    spec = zoo.tiny_llama(layers=3)
    traced = lowbit.trace(spec.model, spec.example_inputs, dynamic_shapes=spec.dynamic_shapes)
    values = [n.operand(0) for n in traced.graph.nodes if n.op == "core.linear"]
    batches = [traced.flatten_inputs((torch.randint(0, 100, (2, 8 + i), generator=torch.Generator().manual_seed(i)),))
               for i in range(5)]
    want = {v.name: TensorStats() for v in values}
    names = {id(v): v.name for v in values}
    for b in batches:
        Executor(traced.graph).run(b, lambda node, outs: [want[names[id(r)]].update(o) for r, o in
                                                          zip(node.results, outs) if id(r) in names])
    for memory in (2 << 30, 0):
        monkeypatch.setattr(calibrate_mod, "BOUNDARY_MEMORY", memory)
        got = calibrate(traced.graph, batches, values, progress=False)
        for name, st in want.items():
            assert (got[name].min, got[name].max) == (st.min, st.max)
            assert torch.equal(got[name].channel_absmax, st.channel_absmax)
            assert torch.equal(got[name].hist, st.hist)


def test_gptq_resumes_from_its_work_folder(folder, tmp_path, monkeypatch):
    """Interrupted after the second block, a second run with the same work folder starts from the
    saved state (it rounds only the remaining blocks' layers) and gives the same model as an
    uninterrupted run; the finished run leaves no state behind."""
    import lowbit.passes.quantize as quantize_mod

    path, _ = folder
    batches = _batches()
    whole = lowbit.compile(str(path), recipe="w4a16-gptq", calibration=batches, progress=False)
    calls, stop = [], [15]  # 7 linears per block: inside the third block
    original = quantize_mod.gptq_quantize

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == stop[0]:
            raise _Interrupted
        return original(*args, **kwargs)

    monkeypatch.setattr(quantize_mod, "gptq_quantize", interrupted)
    work = tmp_path / "work"
    with pytest.raises(_Interrupted):
        lowbit.compile(str(path), recipe="w4a16-gptq", calibration=batches, progress=False, work_dir=work)
    state = json.loads((work / "progress.json").read_text())
    assert state["blocks"] == 2
    calls.clear()
    stop[0] = None
    resumed = lowbit.compile(str(path), recipe="w4a16-gptq", calibration=batches, progress=False, work_dir=work)
    assert len(calls) == 7  # the third block's linears only
    assert any("resumed from" in n and "after 2 of 3 blocks" in n for n in resumed.traced.notes)
    x = torch.randint(0, 300, (1, 17))
    assert torch.equal(whole(x).logits, resumed(x).logits)
    assert not (work / "progress.json").exists() and not list(work.glob("results-*"))
    # another calibration set: the saved state is not used
    calls.clear()
    stop[0] = 15
    with pytest.raises(_Interrupted):
        lowbit.compile(str(path), recipe="w4a16-gptq", calibration=batches, progress=False, work_dir=work)
    calls.clear()
    stop[0] = None
    other = lowbit.compile(str(path), recipe="w4a16-gptq", calibration=_batches(5), progress=False, work_dir=work)
    assert len(calls) == 21 and any("another model, pipeline or calibration set" in n for n in other.traced.notes)


def test_sequential_gptq_is_as_good_as_whole_graph_gptq_on_byte_llama():
    """One sweep, each layer calibrated on the outputs of the layers already rounded, against
    Hessians of the float model: perplexity within 0.5% of each other and of fp32 by 1%."""
    spec = zoo.byte_llama()
    calib, evals = byte_windows("calib")[:32], byte_windows("val")[:32]
    fp32 = perplexity(spec.model, evals)
    ppl = {}
    for sequential in ("true", "false"):
        q = lowbit.compile(spec.model, spec.example_inputs, dynamic_shapes=spec.dynamic_shapes, calibration=calib,
                           pipeline=f"insert-qdq{{weights=int4/group64/asym,rounding=gptq,act_order=true,"
                                    f"sequential={sequential}}}", progress=False)
        ppl[sequential] = perplexity(q, evals)
    assert abs(math.log(ppl["true"] / ppl["false"])) < 0.005, ppl
    assert max(ppl.values()) < 1.01 * fp32, (fp32, ppl)


def test_bad_model_folders_are_named(tmp_path, folder):
    path, model = folder
    empty = tmp_path / "no-weights"
    empty.mkdir()
    model.config.save_pretrained(empty)
    torch.save({}, empty / "pytorch_model.bin")
    with pytest.raises(LowbitError, match="no safetensors weights.*pytorch_model.bin.*never unpickles"):
        weightless_model(empty)
    short = tmp_path / "short"
    short.mkdir()
    model.config.save_pretrained(short)
    from safetensors.torch import save_file

    save_file({"model.embed_tokens.weight": torch.zeros(300, 96)}, short / "model.safetensors")
    with pytest.raises(LowbitError, match="no weights for model.layers.0"):
        weightless_model(short)
    (short / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    with pytest.raises(WeightFileError, match="cannot read the safetensors header"):
        lazy_safetensors(short / "model.safetensors")
    save_file({"w": torch.zeros(64, 64)}, tmp_path / "cut.safetensors")
    data = (tmp_path / "cut.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[:-100])
    with pytest.raises(WeightFileError, match="truncated"):
        lazy_safetensors(tmp_path / "cut.safetensors")
    (tmp_path / "cut.safetensors").write_bytes(data)
    lazy = lazy_safetensors(tmp_path / "cut.safetensors")["w"]
    assert torch.equal(lazy.load(), torch.zeros(64, 64))
    save_file({"w": torch.ones(64, 65)}, tmp_path / "cut.safetensors")  # replaced after it was opened
    with pytest.raises(WeightFileError, match="changed after lowbit opened it"):
        lazy.load()


def test_the_cli_exports_a_model_folder_without_loading_it(folder, tmp_path, capsys):
    """``lowbit export FOLDER`` compiles the folder lazily (with a GPTQ work folder) and writes
    ONNX that ONNX Runtime runs like the compiled model."""
    from lowbit.cli import main

    path, _ = folder
    work = tmp_path / "work"
    assert main(["export", str(path), "--recipe", "w4a16-gptq", "-o", str(tmp_path / "out"),
                 "--work-dir", str(work)]) == 0
    out = capsys.readouterr().out
    assert "read from the model's safetensors files" in out
    assert (tmp_path / "out" / "model.onnx").is_file()
    cosine = float(out.split("cosine ")[1].split()[0])
    assert cosine > 0.9999


def test_a_batch_of_one_traces_and_exports_without_the_cache(folder, tmp_path):
    """An example of one sequence is traced with its size-1 dims tiled to 2; the export takes
    the example tiled the same way (it failed on torch.export's lower bound of 2 before)."""
    from lowbit.backends.onnx import compare_with_torch, export_onnx

    path, _ = folder
    example = (torch.randint(0, 300, (1, 20)),)
    compiled = lowbit.compile(str(path), example, recipe="w4a16", calibration=[example], cache=False,
                              progress=False)
    onnx_path, _ = export_onnx(compiled.traced, tmp_path / "m" / "model.onnx")
    assert compare_with_torch(onnx_path, compiled, [example[0]])["cosine"] > 0.9999


def test_gptq_with_its_boundary_values_on_disk_gives_the_same_model(folder, monkeypatch):
    """The sweep's boundary values written to disk between stops (and read back one value at a
    time for the Hessians) give the model the in-memory sweep gives."""
    path, _ = folder
    batches = _batches()
    held = lowbit.compile(str(path), recipe="w4a16-gptq", calibration=batches, progress=False)
    monkeypatch.setattr(calibrate_mod, "BOUNDARY_MEMORY", 0)
    spilled = lowbit.compile(str(path), recipe="w4a16-gptq", calibration=batches, progress=False)
    x = torch.randint(0, 300, (1, 17))
    assert torch.equal(held(x).logits, spilled(x).logits)


@pytest.mark.parametrize("recipe", ["w4a16", "w8a8"])
def test_the_onnx_export_streams_weights_and_writes_what_an_in_memory_export_writes(folder, tmp_path, recipe,
                                                                                    monkeypatch):
    """Large constants are traced as stand-ins (no memory) and read when their initializer is
    written: the files hold the same initializers (bytes) as an export that traced the real
    tensors, with external data too."""
    import onnx

    import lowbit.backends.onnx.export as export_mod
    from lowbit.backends.onnx import export_onnx

    path, _ = folder
    monkeypatch.setattr(store_mod, "OFFLOAD_MIN_ELEMENTS", 4096)
    compiled = lowbit.compile(str(path), recipe=recipe, calibration=_batches(2), progress=False)
    monkeypatch.setattr(export_mod, "STANDIN_MIN_ELEMENTS", 1 << 40)  # every constant traced as itself
    eager, _ = export_onnx(compiled.traced, tmp_path / "eager" / "model.onnx")
    monkeypatch.setattr(export_mod, "STANDIN_MIN_ELEMENTS", 1000)
    monkeypatch.setattr(export_mod, "TWO_GB", 10_000)  # external data, as a large model's
    graph, _, transposed = export_mod.lower_for_export(compiled.traced)
    module = export_mod._ExportModule(graph, transposed)
    large = [b for b in module.buffers() if b.numel() >= 1000]
    assert large and all(b.untyped_storage().nbytes() <= 8 for b in large)
    assert len(module.sources) == len(large)
    streamed, weights = export_onnx(compiled.traced, tmp_path / "streamed" / "model.onnx")
    assert sorted(p.name for p in (tmp_path / "streamed").iterdir()) == ["model.onnx", "model.onnx.data"]

    def initializers(file):
        model = onnx.load(str(file))
        return {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}

    want, got = initializers(eager), initializers(streamed)
    assert want.keys() == got.keys()
    assert any(a.size >= 1000 for a in got.values())
    for name in want:
        assert want[name].dtype == got[name].dtype and (want[name] == got[name]).all(), name
    if recipe == "w4a16":
        assert any(want[n].dtype.name == "int4" or want[n].dtype.name == "uint4" for n in weights.int4)


def test_calibration_leaves_padding_tokens_out():
    """A padded batch gives the statistics and GPTQ Hessians of its sentences run one by one,
    unpadded: padded positions (attention_mask 0) are read by nothing, so they are not observed."""
    from lowbit.passes.quantize import _hessian
    from lowbit.quant.calibrate import Sweep

    torch.manual_seed(0)
    cfg = tf.BertConfig(vocab_size=120, hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=100, max_position_embeddings=64)
    model = tf.BertModel(cfg, add_pooling_layer=False).eval()
    traced = lowbit.trace(model, kwargs={"input_ids": torch.randint(1, 120, (2, 9)),
                                         "attention_mask": torch.ones(2, 9, dtype=torch.long)})
    ids = [torch.randint(1, 120, (1, n), generator=torch.Generator().manual_seed(n)) for n in (4, 9)]
    padded = torch.zeros(2, 9, dtype=torch.long)
    mask = torch.zeros(2, 9, dtype=torch.long)
    for row, x in enumerate(ids):
        padded[row, : x.shape[1]], mask[row, : x.shape[1]] = x[0], 1
    one_by_one = [traced.flatten_inputs((), {"input_ids": x, "attention_mask": torch.ones_like(x)}) for x in ids]
    together = [traced.flatten_inputs((), {"input_ids": padded, "attention_mask": mask})]
    as_real = [traced.flatten_inputs((), {"input_ids": padded, "attention_mask": torch.ones_like(mask)})]
    values = [n.operand(0) for n in traced.graph.nodes if n.op == "core.linear"]
    want = calibrate(traced.graph, one_by_one, values, progress=False)
    got = calibrate(traced.graph, together, values, progress=False)
    unmasked = calibrate(traced.graph, as_real, values, progress=False)
    moved = 0
    for v in values:
        torch.testing.assert_close(got[v.name].channel_absmax, want[v.name].channel_absmax, rtol=1e-4, atol=1e-5)
        assert got[v.name].min == pytest.approx(want[v.name].min, rel=1e-4, abs=1e-5)
        assert got[v.name].max == pytest.approx(want[v.name].max, rel=1e-4, abs=1e-5)
        moved += not torch.allclose(unmasked[v.name].channel_absmax, want[v.name].channel_absmax, rtol=1e-3)
    assert moved, "the padding tokens should change the statistics when they are counted"
    for v in values[:3]:
        hessians = []
        for batches in (one_by_one, together):
            sweep = Sweep(traced.graph, batches)
            sweep.advance(sweep.executor.step_index(v.producer) + 1)
            hessians.append(_hessian(sweep.tokens(v)))
        torch.testing.assert_close(hessians[1], hessians[0], rtol=1e-4, atol=1e-4)
    empty = [traced.flatten_inputs((), {"input_ids": padded, "attention_mask": torch.zeros_like(mask)})]
    with pytest.raises(CalibrationError, match="every calibration batch is all padding \\(attention_mask is all zeros\\)"):
        calibrate(traced.graph, empty, values, progress=False)


@pytest.mark.parametrize("memory", [2 << 30, 0])
def test_a_sweep_rewound_to_a_mark_runs_the_stretch_again(monkeypatch, memory):
    """Sequential GPTQ rounds a block, rewinds the sweep to the block's start and runs it again
    on the rounded weights: a rewound stretch gives what it gave before, in memory or on disk,
    and a weight pinned after the rewind is what the second run uses."""
    from lowbit.quant.calibrate import Sweep

    monkeypatch.setattr(calibrate_mod, "BOUNDARY_MEMORY", memory)
    spec = zoo.tiny_llama(layers=2)
    traced = lowbit.trace(spec.model, spec.example_inputs, dynamic_shapes=spec.dynamic_shapes)
    linears = [n for n in traced.graph.nodes if n.op == "core.linear"]
    first, later = linears[0], linears[5]
    batches = [traced.flatten_inputs((torch.randint(0, 100, (2, 6 + i), generator=torch.Generator().manual_seed(i)),))
               for i in range(3)]
    sweep = Sweep(traced.graph, batches)
    ex = sweep.executor
    sweep.advance(ex.step_index(first))
    marked = sweep.mark()
    sweep.advance(ex.step_index(later) + 1)
    before = [x.clone() for x in sweep.values(later.results[0])]
    sweep.rewind(marked)
    assert sweep.pos == ex.step_index(first)
    sweep.advance(ex.step_index(later) + 1)
    for a, b in zip(sweep.values(later.results[0]), before):
        assert torch.equal(a, b)
    sweep.rewind(marked)
    assert later.operands[2] is None
    ex.pin(later, 1, torch.zeros_like(traced.graph.tensor(later.operand(1))))
    sweep.advance(ex.step_index(later) + 1)
    assert all(not x.any() for x in sweep.values(later.results[0]))
    assert any(x.any() for x in before)
