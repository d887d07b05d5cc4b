"""compiled.save(dir) / lowbit.load(dir): bit-exact on the torch backend for every recipe, the
same ONNX after a round trip, the triton backend repacked from a save, and clear errors for
folders that are not (or no longer) a lowbit save."""

import json
import shutil
from collections import Counter
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch.utils import _pytree as pytree

import lowbit
from lowbit import zoo
from lowbit.errors import CheckpointError
from lowbit.recipes import builtin_recipes
from lowbit.saving import GRAPH, META, WEIGHTS


def _same(a, b) -> bool:
    la, lb = pytree.tree_leaves(a), pytree.tree_leaves(b)
    return type(a) is type(b) and len(la) == len(lb) and all(torch.equal(x, y) for x, y in zip(la, lb))


@pytest.fixture(scope="module")
def llama():
    spec = zoo.tiny_llama(layers=1, hidden=64)
    traced = lowbit.trace(spec.model, spec.example_inputs, dynamic_shapes=spec.dynamic_shapes)
    calibration = [(zoo._token_inputs(256, seed=i),) for i in range(4)]
    return traced, calibration


@pytest.fixture(scope="module")
def saved(llama, tmp_path_factory):
    traced, calibration = llama
    q = lowbit.compile(traced, recipe="w4a8-rot", calibration=calibration, progress=False)
    return q, q.save(tmp_path_factory.mktemp("saved") / "llama-w4a8-rot")


@pytest.mark.parametrize("recipe", builtin_recipes())
def test_every_recipe_round_trips_bit_exact(llama, recipe, tmp_path):
    traced, calibration = llama
    q = lowbit.compile(traced, recipe=recipe, calibration=calibration, progress=False)
    loaded = lowbit.load(q.save(tmp_path / recipe))
    ids = zoo._token_inputs(256, batch=2, seq=6, seed=9)
    assert _same(loaded(ids), q(ids))
    assert loaded.ir() == q.ir()
    stored = load_file(str(tmp_path / recipe / WEIGHTS))
    for name, tensor in q.graph.tensors.items():  # integer and fp8 codes stay integer and fp8
        assert stored[name].dtype == tensor.dtype, name
    assert any(t.dtype in (torch.int8, torch.uint8, torch.float8_e4m3fn) for t in stored.values())


def test_a_loaded_decoder_generates_the_same_tokens(saved):
    q, folder = saved
    loaded = lowbit.load(folder)
    prompt = zoo._token_inputs(256, batch=2, seq=5, seed=3)
    assert torch.equal(loaded.generate(prompt, max_new_tokens=8), q.generate(prompt, max_new_tokens=8))
    assert loaded.traced.notes == q.traced.notes and loaded.cache_bytes_per_token() == q.cache_bytes_per_token()


def test_a_loaded_model_exports_the_same_onnx(saved, tmp_path):
    q, folder = saved
    a, _ = q.export_onnx(tmp_path / "a" / "model.onnx")
    b, _ = lowbit.load(folder).export_onnx(tmp_path / "b" / "model.onnx")
    assert a.read_bytes() == b.read_bytes()


@pytest.mark.slow
@pytest.mark.parametrize("name,recipe", [("minilm", "w8a8"), ("minilm", "w8a8-rot"), ("byte-llama", "w4a16"),
                                         ("byte-llama", "fp8")])
def test_real_models_round_trip(name, recipe, tmp_path):
    spec = zoo.load_model(name)
    call = (spec.example_inputs, spec.kwargs or {})
    q = lowbit.compile(spec.model, spec.example_inputs, kwargs=spec.kwargs or None, recipe=recipe,
                       dynamic_shapes=spec.dynamic_shapes, calibration=[spec.kwargs or spec.example_inputs] * 4,
                       progress=False, rotation="always")  # the guard's comparison is not what is tested
    loaded = lowbit.load(q.save(tmp_path / "m"))
    assert _same(loaded(*call[0], **call[1]), q(*call[0], **call[1]))
    if (name, recipe) == ("minilm", "w8a8"):  # an encoder: its ONNX export is the same too
        a, _ = q.export_onnx(tmp_path / "a" / "model.onnx")
        b, _ = loaded.export_onnx(tmp_path / "b" / "model.onnx")
        assert a.read_bytes() == b.read_bytes()


@pytest.mark.parametrize("recipe,kernel", [("w4a8-rot", "scaled_mm"), ("w4a16-rtn", "w4a16_mm")])
def test_load_on_the_triton_backend_repacks(llama, recipe, kernel, tmp_path):
    """The saved int4 codes become the kernels' forms again: less their zero points, as int8, for
    the integer GEMM (w4a8-rot; at hidden 64 a group of 128 spans the row), or packed two per
    byte for the dequantizing GEMM (w4a16)."""
    traced, calibration = llama
    folder = lowbit.compile(traced, recipe=recipe, calibration=calibration, progress=False).save(tmp_path / recipe)
    fresh = lowbit.compile(traced, recipe=recipe, calibration=calibration, progress=False, backend="triton")
    loaded = lowbit.load(folder, backend="triton")
    assert Counter(loaded.kernel_nodes().values()) == Counter(fresh.kernel_nodes().values())
    assert kernel in set(loaded.kernel_nodes().values())
    ids = zoo._token_inputs(256, batch=1, seq=5, seed=2)
    assert torch.equal(loaded(ids).logits, fresh(ids).logits)


def test_saving_over_an_earlier_save_replaces_it(saved, llama, tmp_path):
    q, _ = saved
    folder = q.save(tmp_path / "m")
    traced, calibration = llama
    other = lowbit.compile(traced, recipe="w8a8", calibration=calibration, progress=False)
    other.save(folder)
    assert lowbit.load(folder).ir() == other.ir()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no temporary folder left


def _copy(folder: Path, tmp_path: Path) -> Path:
    out = tmp_path / "copy"
    shutil.copytree(folder, out)
    return out


def test_foreign_and_corrupt_folders_are_refused(saved, tmp_path):
    _, folder = saved
    with pytest.raises(CheckpointError, match="is not a folder"):
        lowbit.load(tmp_path / "missing")
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match=f"no {META}.*transformers model folder"):
        lowbit.load(hf)
    bad = _copy(folder, tmp_path)
    (bad / META).write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        lowbit.load(bad)
    meta = json.loads((folder / META).read_text())
    (bad / META).write_text(json.dumps({**meta, "format": "something-else"}))
    with pytest.raises(CheckpointError, match="not a lowbit save"):
        lowbit.load(bad)
    (bad / META).write_text(json.dumps({**meta, "version": 99}))
    with pytest.raises(CheckpointError, match="version 99.*upgrade lowbit"):
        lowbit.load(bad)


@pytest.mark.parametrize("lazy", [False, True])
def test_changed_or_truncated_weights_are_refused(saved, tmp_path, lazy):
    _, folder = saved
    bad = _copy(folder, tmp_path)
    data = (bad / WEIGHTS).read_bytes()
    (bad / WEIGHTS).write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="cannot be read"):
        lowbit.load(bad, lazy=lazy)
    tensors = load_file(str(folder / WEIGHTS))
    name = next(k for k, t in tensors.items() if t.dtype == torch.int8 and t.dim() == 2)
    changed = dict(tensors)
    changed[name] = tensors[name].clone()
    changed[name][0, 0] = -changed[name][0, 0] - 1
    save_file(changed, str(bad / WEIGHTS))
    with pytest.raises(CheckpointError, match="changed or corrupt"):
        lowbit.load(bad, lazy=lazy)
    changed[name] = tensors[name].to(torch.int32)
    save_file(changed, str(bad / WEIGHTS))
    with pytest.raises(CheckpointError, match=f"{name}.*torch.int32"):
        lowbit.load(bad, lazy=lazy)
    del changed[name]
    save_file(changed, str(bad / WEIGHTS))
    with pytest.raises(CheckpointError, match=f"does not match.*no tensor '{name}'"):
        lowbit.load(bad, lazy=lazy)
    (bad / GRAPH).unlink()
    with pytest.raises(CheckpointError, match=f"no {GRAPH}: the save is incomplete"):
        lowbit.load(bad, lazy=lazy)


def test_a_large_save_loads_lazily_and_runs_the_same(saved, monkeypatch):
    """Loaded lazily (by default past ``LAZY_LOAD_BYTES``), the constants stay in the weights
    file and are read when used; the model computes the same."""
    import lowbit.saving as saving

    q, folder = saved
    loaded = lowbit.load(folder, lazy=True)
    store = loaded.traced.graph.tensors
    assert len(store) and all(store.is_lazy(n) for n in store)
    assert not any(lowbit.load(folder).traced.graph.tensors.is_lazy(n) for n in store)
    monkeypatch.setattr(saving, "LAZY_LOAD_BYTES", 0)
    assert all(lowbit.load(folder).traced.graph.tensors.is_lazy(n) for n in store)
    ids = zoo._token_inputs(256, batch=2, seq=6, seed=9)
    assert _same(loaded(ids), q(ids))


def test_a_failed_save_leaves_nothing(saved, tmp_path, monkeypatch):
    q, _ = saved
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    with pytest.raises(CheckpointError, match="cannot write"):
        q.save(blocker / "m")
    with pytest.raises(CheckpointError, match="not a saved lowbit model"):
        q.save(tmp_path)  # a folder holding other things
    import lowbit.saving as saving

    def fail(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(saving, "write_safetensors", fail)
    with pytest.raises(CheckpointError, match="No space left"):
        q.save(tmp_path / "m")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.txt"]


def test_cli_saves_and_exports_a_saved_model(tmp_path, capsys):
    from lowbit.cli import main

    assert main(["export", "tiny-llama", "--recipe", "w8a8", "--save", str(tmp_path / "saved")]) == 0
    assert "saved" in capsys.readouterr().out and (tmp_path / "saved" / META).is_file()
    assert main(["export", str(tmp_path / "saved"), "-o", str(tmp_path / "onnx")]) == 0
    printed = capsys.readouterr()
    assert (tmp_path / "onnx" / "model.onnx").is_file() and "compiling" not in printed.err  # not compiled again
    assert "ONNX Runtime vs lowbit torch backend" in printed.out
    with pytest.raises(SystemExit, match="already compiled"):
        main(["export", str(tmp_path / "saved"), "--recipe", "w4a16", "-o", str(tmp_path / "x")])
