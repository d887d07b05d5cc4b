"""Complex arithmetic in a model (rotary embeddings written with ``polar`` and
``view_as_complex``) is traced as pairs of real tensors: the compiled model equals eager, at
another shape too, and exports to ONNX; what has no real form is refused by name."""

import pytest
import torch

import lowbit
from lowbit.errors import TraceError
from lowbit.frontend import trace


class _ComplexOps(torch.nn.Module):
    """Every rule of lowbit.frontend.complex on one path: a complex buffer, polar, views, the
    products with complex, real, float and complex-number operands, quotients, sums, conj,
    exp, abs, angle, cat and indexing."""

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(8, 8)
        self.register_buffer("phase", torch.polar(torch.ones(4), torch.linspace(0, 3, 4)))

    def forward(self, x):  # x: [batch, seq, 8]
        pos = torch.arange(x.shape[1], dtype=torch.float32)[:, None] * torch.tensor([1.0, 0.5, 0.25, 0.125])
        rot = torch.polar(torch.ones_like(pos), pos) * 0.5
        z = torch.view_as_complex(self.proj(x).reshape(*x.shape[:-1], 4, 2))
        w = z * rot.unsqueeze(0) * self.phase + (1 - 2j) * z.conj() - z / (rot + 2)
        w = torch.cat([w, torch.exp(z * 0.1j)], dim=-1)[:, :, 1:]
        w = w * torch.sigmoid(x[..., :7]) - w.transpose(0, 1).transpose(0, 1).real
        return torch.view_as_real(w).flatten(2), w.abs() + w.angle() + w.imag


class _Returns(torch.nn.Module):
    def forward(self, x):
        return torch.view_as_complex(x)


class _Real(torch.nn.Module):
    def forward(self, x):
        return torch.view_as_real(x * 2)


class _Fft(torch.nn.Module):
    def forward(self, x):
        return torch.fft.fft(torch.view_as_complex(x)).real


def test_complex_arithmetic_is_traced_as_real_pairs_and_equals_eager(tmp_path):
    torch.manual_seed(0)
    model, x = _ComplexOps().eval(), torch.randn(2, 5, 8)
    traced = trace(model, (x,), dynamic_shapes={"x": {0: "batch", 1: "seq"}})
    assert not any("complex" in str(v.type) for n in traced.graph.nodes for v in n.results)
    assert any(n.op == "aten.stack.default" for n in traced.graph.nodes)  # view_as_real of the pairs
    compiled = lowbit.compile(model, (x,), dynamic_shapes={"x": {0: "batch", 1: "seq"}})
    for shape in ((2, 5, 8), (3, 11, 8)):
        y = torch.randn(*shape)
        for got, want in zip(compiled(y), model(y)):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    path, _ = compiled.export_onnx(tmp_path / "complex.onnx")
    ort = pytest.importorskip("onnxruntime")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    y = torch.randn(3, 6, 8)
    got = session.run(None, {session.get_inputs()[0].name: y.numpy()})
    torch.testing.assert_close(torch.from_numpy(got[0]), model(y)[0], rtol=1e-4, atol=1e-4)


def test_complex_without_a_real_form_is_refused_by_name():
    with pytest.raises(TraceError, match="returns a complex tensor"):
        trace(_Returns(), (torch.randn(3, 2),))
    with pytest.raises(TraceError, match=r"complex values reach aten\.fft_fft"):
        trace(_Fft(), (torch.randn(4, 2),))
    with pytest.raises(TraceError, match="input x is complex"):
        trace(_Real(), (torch.randn(4, dtype=torch.complex64),))
