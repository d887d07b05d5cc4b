"""``lowbit.compile`` and the ``lowbit`` command line."""

import subprocess
import sys

import pytest
import torch

import lowbit
from lowbit.cli import main
from lowbit.zoo import tiny_cnn, tiny_gpt2


def test_compile_keeps_output_structure_and_numbers():
    spec = tiny_gpt2()
    fast = lowbit.compile(spec.model, spec.example_inputs, dynamic_shapes=spec.dynamic_shapes)
    for ids in (spec.example_inputs[0], torch.randint(0, 256, (1, 7))):
        out, ref = fast(ids), spec.model(ids)
        assert type(out) is type(ref)
        assert torch.allclose(out.logits, ref.logits, atol=1e-5, rtol=1e-5)
    assert "core.linear" in fast.ir() and "aten.addmm" not in fast.ir()
    assert [r.name for r in fast.records][0] == "input"


def test_compiled_module_buffers_follow_dtype_changes():
    spec = tiny_cnn()
    fast = lowbit.compile(spec.model, spec.example_inputs, dynamic_shapes=spec.dynamic_shapes)
    assert sum(b.numel() for b in fast.buffers()) == sum(t.numel() for t in fast.graph.tensors.values())
    fast.double()
    out = fast(spec.example_inputs[0].double())
    assert out.dtype == torch.float64
    assert torch.allclose(out.float(), spec.model(spec.example_inputs[0]), atol=1e-5)


def test_compile_rejects_bad_pipeline_before_tracing():
    with pytest.raises(lowbit.PipelineError, match="unknown pass 'smoth'"):
        lowbit.compile(torch.nn.ReLU(), (torch.randn(2),), pipeline="smoth")


def test_inspect_prints_table_and_dumps(tmp_path, capsys):
    assert main(["inspect", "tiny-cnn", "--dump-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "fold-batchnorm" in out and "drift" in out
    assert (tmp_path / "00-input.ir").exists()
    assert "core.batch_norm" not in next(tmp_path.glob("*-fold-batchnorm.ir")).read_text()


def test_inspect_why_not(capsys):
    assert main(["inspect", "tiny-cnn", "--no-drift", "--why-not", "fold-batchnorm"]) == 0
    assert "fold-batchnorm: 0 candidate node(s) did not match" in capsys.readouterr().out


def test_inspect_errors_exit_2(capsys):
    assert main(["inspect", "tiny-lama"]) == 2
    assert "unknown model 'tiny-lama'" in capsys.readouterr().err
    assert main(["inspect", "tiny-cnn", "--pipeline", "fold-constants{"]) == 2
    assert "expected an option name" in capsys.readouterr().err


def test_inspect_file_factory(tmp_path, capsys):
    f = tmp_path / "mymodel.py"
    f.write_text("import torch\n"
                 "def make():\n"
                 "    m = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Dropout(0.1), torch.nn.GELU())\n"
                 "    return m, (torch.randn(2, 4),), ({0: 'batch'},)\n")
    assert main(["inspect", f"{f}:make"]) == 0
    assert "remove-identities" in capsys.readouterr().out


def test_inspect_module_factory_and_transformers_dir(tmp_path, capsys):
    assert main(["inspect", "lowbit.zoo:tiny_vit", "--no-drift"]) == 0
    spec = tiny_gpt2()
    spec.model.transformer.save_pretrained(tmp_path / "gpt2")
    assert main(["inspect", str(tmp_path / "gpt2")]) == 0
    assert "addmm-to-linear" in capsys.readouterr().out


def test_console_script_runs():
    out = subprocess.run([sys.executable, "-m", "lowbit.cli", "passes"], capture_output=True, text=True)
    assert out.returncode == 0 and "fuse-attention" in out.stdout and "canonicalize" in out.stdout
