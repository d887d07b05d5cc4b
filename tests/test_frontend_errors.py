"""Bad input gets a clear message: untraceable models, unknown models, bad arguments."""

import pytest
import torch

from lowbit.errors import ModelSpecError, TraceError
from lowbit.frontend import trace
from lowbit.zoo import load_model


class _DataDependent(torch.nn.Module):
    def forward(self, x):
        if x.sum() > 0:  # control flow on tensor values: torch.export cannot trace it
            return x * 2
        return x


class _Outer(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(4, 4)
        self.gate = _DataDependent()

    def forward(self, x):
        return self.gate(self.proj(x))


def test_untraceable_model_names_module_and_reason():
    with pytest.raises(TraceError) as e:
        trace(_Outer(), (torch.randn(2, 4),))
    msg = str(e.value)
    assert "torch.export could not trace _Outer" in msg
    assert "inside module gate (_DataDependent)" in msg
    assert "test_frontend_errors.py" in msg and "if x.sum() > 0" in msg
    assert "torch says" in msg and "data-dependent" in msg.lower()


def test_trace_argument_errors():
    with pytest.raises(TypeError, match="needs a torch.nn.Module"):
        trace(lambda x: x, (torch.randn(2),))
    with pytest.raises(TypeError, match="example_inputs is a int; give a tuple of positional arguments"):
        trace(torch.nn.ReLU(), 3)
    assert len(trace(torch.nn.ReLU(), torch.randn(2)).graph.inputs) == 1  # one tensor is one argument


def test_unknown_zoo_name_lists_valid_names():
    with pytest.raises(ModelSpecError) as e:
        load_model("tiny-lama")
    msg = str(e.value)
    assert "Did you mean tiny-llama" in msg
    for name in ("tiny-llama", "tiny-gpt2", "minilm", "tiny-vit", "tiny-cnn"):
        assert name in msg


def test_bad_factory_specs():
    with pytest.raises(ModelSpecError, match="no such file"):
        load_model("does/not/exist.py:make")
    with pytest.raises(ModelSpecError, match="cannot import module"):
        load_model("no_such_package_xyz.models:make")
    with pytest.raises(ModelSpecError, match="has no callable 'nope'"):
        load_model("lowbit.zoo:nope")


class _Counter(torch.nn.Module):
    """State carried from call to call: the count read, then written."""

    def __init__(self):
        super().__init__()
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x):
        self.calls.add_(1)
        return x * self.calls


class _Recomputed(torch.nn.Module):
    """A buffer overwritten from the input before it is read (transformers' longrope picks its
    frequencies this way on every call): nothing is carried between calls."""

    def __init__(self):
        super().__init__()
        self.register_buffer("freq", torch.ones(4))
        self.register_buffer("short", torch.full((4,), 2.0))
        self.register_buffer("long", torch.full((4,), -3.0))

    def forward(self, x):
        self.freq.copy_(torch.where(x.shape[0] * x.abs().amax() > 8, self.long, self.short))
        return x * self.freq


def test_state_carried_between_calls_is_refused_and_a_recomputed_buffer_is_not():
    with pytest.raises(TraceError, match=r"mutates state during forward \(calls\)"):
        trace(_Counter(), (torch.randn(2, 4),))
    traced = trace(_Recomputed(), (torch.randn(2, 4),), dynamic_shapes=({0: "batch"},))
    from lowbit.ir import run_graph

    model = _Recomputed()
    for x in (torch.full((2, 4), 0.5), torch.full((3, 4), 5.0)):  # the short, then the long set
        assert torch.equal(run_graph(traced.graph, [x])[0], model(x))
