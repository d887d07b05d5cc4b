import os

import pytest
import torch

from lowbit.ir import Graph, TensorType

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Triton kernels run in Triton's interpreter on CPU tensors when there is no GPU; the flag must
# be set before any kernel module is imported (Triton reads it when a kernel is defined).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Two cores: one thread per pytest-xdist worker (``-n 2``), both threads in a plain run.
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else 2)


def pytest_addoption(parser):
    parser.addoption("--update-golden", action="store_true",
                     help="rewrite tests/golden/*.expected.ir from the current output")


@pytest.fixture
def update_golden(request) -> bool:
    return bool(request.config.getoption("--update-golden"))


def sample_inputs(graph: Graph, sizes: dict[str, int] | None = None, seed: int = 0) -> list:
    """Random inputs for a graph's inputs, symbolic dims given by ``sizes`` (default 3)."""
    sizes = sizes or {}
    gen = torch.Generator().manual_seed(seed)
    out = []
    for v in graph.inputs:
        t = v.type
        assert isinstance(t, TensorType)
        shape = [d if isinstance(d, int) else sizes.get(d, 3) for d in t.shape]
        if t.dtype.is_float:
            out.append(torch.randn(shape, generator=gen).to(t.dtype.storage))
        else:
            out.append(torch.randint(0, 10, shape, generator=gen).to(t.dtype.storage))
    return out


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().cpu().double(), b.detach().cpu().double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def kernel_devices() -> list:
    """Devices the Triton kernel tests run on: the CPU under Triton's interpreter (CI) and a CUDA
    GPU (marked ``gpu``, skipped without one). Use with ``@pytest.mark.parametrize("device", ...)``."""
    from lowbit.backends.triton.runtime import interpreting, triton_available

    cpu_ok = triton_available() and interpreting()
    return [
        pytest.param("cpu", marks=pytest.mark.skipif(not cpu_ok, reason="needs triton and TRITON_INTERPRET=1")),
        pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
            not (triton_available() and torch.cuda.is_available()), reason="needs a CUDA GPU")]),
    ]
