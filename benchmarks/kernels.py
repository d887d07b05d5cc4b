"""The Triton kernels against torch's fp16 (and bf16) matmul, cuBLAS, in one run.

    python benchmarks/kernels.py --out bench-kernels/            # on a CUDA GPU
    python benchmarks/kernels.py --smoke --out /tmp/k            # tiny shapes on the CPU (checks the script)

Llama-7B/8B layer shapes (K×N: 4096×4096, 4096×11008, 4096×14336, 11008×4096) and
M ∈ {1, 16, 128, 512, 2048, 4096}:
- W8A8: int8 × int8 → fp16 with per-token × per-channel scales (``scaled_mm``), vs fp16 matmul;
  also the whole linear (per-token quantize + GEMM);
- W4A16: int4 weights, group 128 (``w4a16_mm``), vs fp16 matmul;
- FP8 e4m3 with per-row scales vs bf16 matmul (needs sm_89+);
- fused Hadamard + per-token int8 quantize vs a plain copy of the activation (dim ≤ 8192).
Writes kernels.csv/.md (time, TFLOP/s or GB/s, ratio; rewritten after each shape, so a run
stopped early leaves the shapes done), hadamard.csv/.md and kernels.svg (speed-up vs M) to
--out, and prints each acceptance figure (``_acceptance.py``) with whether it is met.
"""

from __future__ import annotations

from pathlib import Path

import torch

from _acceptance import print_figures
from _gpu import bench as _bench
from _gpu import device_name, gpu_parser, run_device, svg_lines, write_table

def bench(fn, device: str) -> float:
    """Kernels timed as CUDA-graph replays (``_gpu.bench``), torch's matmul and copies too."""
    return _bench(fn, device, graph=True)


SHAPES = [(4096, 4096), (4096, 11008), (4096, 14336), (11008, 4096)]  # (K, N)
MS = [1, 16, 128, 512, 2048, 4096]
HADAMARD_DIMS = [1024, 2048, 4096, 8192]


def _inputs(m: int, k: int, n: int, device: str, dtype: torch.dtype):
    x = torch.randn(m, k, device=device, dtype=dtype)
    w = torch.randn(n, k, device=device, dtype=dtype) / k ** 0.5
    return x, w


def _int8(m, k, n, device):
    a = torch.randint(-127, 128, (m, k), device=device, dtype=torch.int8)
    b = torch.randint(-127, 128, (n, k), device=device, dtype=torch.int8)
    return a, b, torch.rand(m, device=device) / 100, torch.rand(n, device=device) / 100


def packed_int4(k: int, n: int, device: str) -> list:
    """Random int4 weights [n, k], group 128, packed once per shape (packing runs on the CPU)."""
    from lowbit.backends.triton.w4a16 import pack_int4

    q = torch.randint(-8, 8, (n, k), dtype=torch.int8)
    packed = pack_int4(q, torch.rand(n, k // 128) / 8, None, 128)
    return [p if p is None else p.to(device) for p in (packed.qweight, packed.scales, packed.zeros)]


def gemm_rows(m: int, k: int, n: int, device: str, dtype: torch.dtype, fp8: bool, packed: list) -> list[dict]:
    from lowbit.backends.triton.gemm import scaled_mm
    from lowbit.backends.triton.w4a16 import w4a16_mm

    flops = 2 * m * n * k
    x, w = _inputs(m, k, n, device, dtype)
    base = bench(lambda: torch.nn.functional.linear(x, w), device)
    def row(kernel, t, ratio, weight_bytes, act_bytes):
        moved = n * k * weight_bytes + m * k * act_bytes + m * n * 2
        return dict(kernel=kernel, M=m, K=k, N=n, ms=t, tflops=flops / t / 1e9, gbs=moved / t / 1e6, ratio=ratio)

    rows = [row("fp16 matmul (cuBLAS)", base, 1.0, 2, 2)]

    a, b, sa, sb = _int8(m, k, n, device)
    t = bench(lambda: scaled_mm(a, b, sa, sb, None, None, None, dtype), device)
    rows.append(row("W8A8 scaled_mm", t, base / t, 1, 1))
    t = bench(lambda: _w8a8_linear(x, b, sb, dtype), device)
    rows.append(row("W8A8 linear (quantize + GEMM)", t, base / t, 1, 2))

    t = bench(lambda: w4a16_mm(x, *packed, 128, None), device)
    rows.append(row("W4A16 g128", t, base / t, 0.5, 2))

    if fp8:
        xb, wb = x.bfloat16(), w.bfloat16()
        bf = bench(lambda: torch.nn.functional.linear(xb, wb), device)
        a8, b8 = x.to(torch.float8_e4m3fn), w.to(torch.float8_e4m3fn)
        t = bench(lambda: scaled_mm(a8, b8, sa, sb, None, None, None, torch.bfloat16), device)
        rows.append(row("FP8 scaled_mm (vs bf16)", t, bf / t, 1, 1))
    return rows


def _w8a8_linear(x, b, sb, dtype):
    from lowbit.backends.triton.gemm import scaled_mm
    from lowbit.backends.triton.quantize import dynamic_quant

    q, s, _ = dynamic_quant(x, 8, True)
    return scaled_mm(q, b, s, sb, None, None, None, dtype)


def hadamard_rows(m: int, dims: list[int], device: str, dtype: torch.dtype) -> list[dict]:
    from lowbit.backends.triton.quantize import hadamard_quant

    rows = []
    for d in dims:
        x = torch.randn(m, d, device=device, dtype=dtype)
        copy = bench(lambda: x.clone(), device)
        t = bench(lambda: hadamard_quant(x, 8, True), device)
        gbs = 2 * x.numel() * x.element_size() / copy / 1e6
        rows.append(dict(kernel="Hadamard + int8 quantize", M=m, K=d, ms=t, copy_ms=copy,
                         time_vs_copy=t / copy, copy_gbs=gbs))
    return rows


def main() -> None:
    ap = gpu_parser(__doc__, "bench-kernels")
    ap.add_argument("--ms", default=None, help="comma-separated M values")
    args = ap.parse_args()
    device = run_device(args, "kernels.py")
    dtype = torch.float32 if args.smoke else torch.float16
    shapes = [(128, 96), (256, 64)] if args.smoke else SHAPES
    ms = [int(v) for v in args.ms.split(",")] if args.ms else ([1, 16, 48] if args.smoke else MS)
    fp8 = device == "cuda" and torch.cuda.get_device_capability() >= (8, 9)
    print(f"device: {device_name(device)}", flush=True)
    folder = Path(args.out)
    folder.mkdir(parents=True, exist_ok=True)
    had = hadamard_rows(32 if args.smoke else 8192, [64, 256] if args.smoke else HADAMARD_DIMS, device, dtype)
    write_table(had, folder, "hadamard")
    rows: list[dict] = []
    for k, n in shapes:
        packed = packed_int4(k, n, device)
        rows += [r for m in ms for r in gemm_rows(m, k, n, device, dtype, fp8, packed)]
        write_table(rows, folder, "kernels")
        print(f"shape K={k} N={n} done", flush=True)
    plot(rows, folder)
    print((folder / "kernels.md").read_text())
    print((folder / "hadamard.md").read_text())
    print_figures(folder, ("kernels", "hadamard"), args.smoke)


def plot(rows: list[dict], folder: Path) -> None:
    """kernels.svg: each kernel's speed-up over fp16 (bf16 for FP8) against M, per shape."""
    series: dict[str, list[tuple[float, float]]] = {}
    for r in rows:
        if r["kernel"] != "fp16 matmul (cuBLAS)":
            series.setdefault(f"{r['kernel']} {r['K']}×{r['N']}", []).append((r["M"], r["ratio"]))
    svg_lines(series, folder / "kernels.svg", "speed-up over torch fp16 matmul (cuBLAS)", "M (tokens)", "× faster")


if __name__ == "__main__":
    main()
