"""Latency of the torch backend's packed CPU GEMMs (lowbit/backends/torch/packed.py) against
the reference quantized linear and float, on one Llama decoder layer's linears.

The stack is TinyLlama-1.1B's: hidden 2048, FFN 5632, 32 query and 4 key/value heads, so q and
o are 2048→2048, k and v 2048→256, gate and up 2048→5632, down 5632→2048 (44 M weights). Each
scheme quantizes random weights the way its recipe would:

- w4a16: int4 with a zero point, groups of 128 along K   → Int4Linear (int4pack_mm)
- w8a16: int8 symmetric, one scale per output channel     → Int8Linear (int8pack_mm)
- w8a8-dynamic: as w8a16, input quantized per token first → Int8Linear (int8pack_mm)

One call runs all seven linears on an input of M rows (M=1: decode, M=64: a prompt chunk), with
these columns, in ms: "float" (F.linear on float weights), "reference" (the op's reference:
dequantize the weight, then F.linear), "packed" (the node's module as the torch backend runs it:
the kernel where ``packed.fits``, else the reference; the path taken in brackets) and "kernel"
(the packed GEMM called directly, whatever ``fits`` says: why float32/float16 inputs with more
than ``SCALAR_ROWS`` rows keep the reference). The variants take turns, call after call; each
number is a median. One torch thread by default: on a shared two-core machine a second thread
waits on whatever else runs on the other core, and the medians then snap to the scheduler's
time slices.

    python benchmarks/torch_packed.py
    python benchmarks/torch_packed.py --runs 9 --threads 2 --dtypes float32
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from lowbit.backends.torch import packed
from lowbit.ir import Graph, TensorType
from lowbit.ir.interpreter import node_callable
from lowbit.ir.types import DType

HIDDEN, FFN, KV = 2048, 5632, 256
SHAPES = {"q": (HIDDEN, HIDDEN), "k": (KV, HIDDEN), "v": (KV, HIDDEN), "o": (HIDDEN, HIDDEN),
          "gate": (FFN, HIDDEN), "up": (FFN, HIDDEN), "down": (HIDDEN, FFN)}  # [out, in]
SCHEMES = ("w4a16", "w8a16", "w8a8-dynamic")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


class Layer:
    """One linear of the stack: its IR node, the reference's operands and the packed module."""

    def __init__(self, scheme: str, n: int, k: int, gen: torch.Generator):
        dtype, group = (DType.i4, 128) if scheme == "w4a16" else (DType.i8, None)
        lo, hi = dtype.int_range
        shape = (n,) if group is None else (n, k // group)
        self.weight_q = torch.randint(lo, hi + 1, (n, k), generator=gen).to(torch.int8)
        self.scale = torch.rand(shape, generator=gen) * 0.01 + 1e-3
        self.zero = torch.randint(lo, hi + 1, shape, generator=gen).to(torch.int8) if group else None
        self.float_weight = torch.randn(n, k, generator=gen) * 0.02
        graph = Graph()
        x = graph.add_input("x", TensorType(("m", k), DType.f32))
        operands = [graph.constant(self.weight_q, "w.q", dtype=dtype), graph.constant(self.scale, "w.scale"),
                    None if group is None else graph.constant(self.zero, "w.zero", dtype=dtype), None]
        attrs = {"axis": 1, "group_size": group} if group else {"axis": 0}
        if scheme == "w8a8-dynamic":
            node = graph.append("quant.dynamic_linear", [x, *operands], {"act_dtype": DType.i8, **attrs})
        else:
            node = graph.append("quant.linear", [x, *operands], attrs)
        self.reference, self.attrs = node_callable(node)
        self.module = packed.prepare(node, graph)
        assert self.module is not None, f"{scheme}: no packed kernel takes {n}x{k}"


def stack(scheme: str, dtype: torch.dtype) -> dict[str, Layer]:
    gen = torch.Generator().manual_seed(0)
    layers = {name: Layer(scheme, n, k, gen) for name, (n, k) in SHAPES.items()}
    for layer in layers.values():
        layer.module.to(dtype)
        layer.float_weight, layer.scale = layer.float_weight.to(dtype), layer.scale.to(dtype)
    return layers


def variants(layers: dict[str, Layer]) -> dict:
    """Variant name → fn(inputs) running the seven linears; inputs: the input per linear."""
    def run(call):
        return lambda xs: [call(layer, xs[name]) for name, layer in layers.items()]

    def kernel(layer, x):
        return layer.module.mm(x)  # 2-D, contiguous, and w8a8-dynamic's own rounding left out

    return {
        "float": run(lambda layer, x: F.linear(x, layer.float_weight)),
        "reference": run(lambda layer, x: layer.reference(x, layer.weight_q, layer.scale, layer.zero,
                                                           None, **layer.attrs)),
        "packed": run(lambda layer, x: layer.module(x, None, None, None, None)),
        "kernel": run(kernel),
    }


def time_turns(fns: dict, inputs: dict, warmup: int, runs: int) -> dict[str, float]:
    """Median ms per call of each variant, the variants called in a rotating order."""
    for fn in fns.values():
        for _ in range(warmup):
            fn(inputs)
    names = list(fns)
    times: dict[str, list[float]] = {name: [] for name in names}
    for i in range(runs):
        for name in names[i % len(names):] + names[:i % len(names)]:
            start = time.perf_counter()
            fns[name](inputs)
            times[name].append(time.perf_counter() - start)
    return {name: 1e3 * statistics.median(t) for name, t in times.items()}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls of each first")
    parser.add_argument("--runs", type=int, default=5, help="timed calls of each")
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 64], help="input rows M")
    parser.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    parser.add_argument("--schemes", nargs="+", default=list(SCHEMES), choices=list(SCHEMES))
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.backends.cpu.get_cpu_capability()}, {args.threads} threads; "
          f"ms per call of 7 linears ({sum(n * k for n, k in SHAPES.values()) / 1e6:.0f} M weights), "
          f"median of {args.runs}")
    print(f"{'scheme':<13} {'dtype':<9} {'M':>3} {'float':>8} {'reference':>10} {'packed':>8} {'(path)':<11} "
          f"{'kernel':>8} {'ref/packed':>10}")
    with torch.no_grad():
        for scheme in args.schemes:
            for dname in args.dtypes:
                layers = stack(scheme, DTYPES[dname])
                for m in args.rows:
                    gen = torch.Generator().manual_seed(m)
                    inputs = {name: torch.randn(m, k, generator=gen).to(DTYPES[dname])
                              for name, (_, k) in SHAPES.items()}
                    ms = time_turns(variants(layers), inputs, args.warmup, args.runs)
                    path = "kernel" if packed.fits(inputs["q"], layers["q"].module.scale) else "reference"
                    print(f"{scheme:<13} {dname:<9} {m:>3} {ms['float']:>8.2f} {ms['reference']:>10.2f} "
                          f"{ms['packed']:>8.2f} {'(' + path + ')':<11} {ms['kernel']:>8.2f} "
                          f"{ms['reference'] / ms['packed']:>9.1f}x", flush=True)


if __name__ == "__main__":
    main()
