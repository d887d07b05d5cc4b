"""Candidate tile configurations of the int4 and int8 GEMMs, timed on this GPU, in one run.

    python benchmarks/tune_kernels.py --out tune/          # on a CUDA GPU, about a minute
    python benchmarks/tune_kernels.py --smoke --out /tmp/t  # tiny shapes on the CPU (checks the script)

For each M and Llama-7B layer shape (K×N 4096×4096 and 4096×11008), every candidate
configuration of ``w4a16_mm`` (tiles, pipeline stages, split-K target) and of ``scaled_mm``
(tiles) is timed as CUDA-graph replays after an L2 flush (``_gpu.bench``), beside torch's fp16
matmul. Writes tune.csv/.md (one row per candidate, its time, its speed-up over fp16, and whether
it is the configuration the kernel's table picks today) and prints, per kernel and M, the fastest
candidate: what ``GPU_CONFIGS`` in ``lowbit/backends/triton/{w4a16,gemm}.py`` should hold.
"""

from __future__ import annotations

from pathlib import Path

import torch

from _gpu import bench, device_name, gpu_parser, run_device, write_table
from kernels import _int8, packed_int4

SHAPES = [(4096, 4096), (4096, 11008)]
MS = [1, 16, 128, 512, 2048]


def w4_candidates(m: int) -> list:
    from lowbit.backends.triton.gemm import MMConfig
    from lowbit.backends.triton.w4a16 import W4Config

    if m <= 16:
        return [W4Config(MMConfig(16, bn, 128, group_m=1, num_warps=4, num_stages=st), programs_per_sm=pps)
                for bn in (32, 64, 128) for st in (3, 5) for pps in (2, 4, 8)]
    tiles = [(32, 64, 128, 4, 4), (64, 64, 128, 4, 4), (64, 128, 64, 4, 4), (64, 128, 128, 4, 3),
             (128, 64, 128, 4, 3), (128, 128, 64, 8, 3), (128, 128, 128, 8, 3), (128, 256, 64, 8, 3)]
    return [W4Config(MMConfig(bm, bn, bk, group_m=8, num_warps=w, num_stages=st), programs_per_sm=pps)
            for bm, bn, bk, w, st in tiles for pps in ((0, 1, 2) if m <= 128 else (0,))]


def mm_candidates(m: int) -> list:
    from lowbit.backends.triton.gemm import MMConfig

    small = [(16, 32, 256, 4, 4), (16, 64, 256, 4, 4), (16, 64, 512, 4, 3), (32, 64, 256, 4, 4)]
    mid = [(64, 64, 128, 4, 4), (64, 128, 128, 4, 4), (64, 128, 256, 4, 3), (128, 64, 128, 4, 4)]
    large = [(128, 128, 128, 8, 3), (128, 256, 128, 8, 3), (128, 128, 256, 8, 3), (256, 128, 128, 8, 3)]
    tiles = (small + mid) if m <= 16 else (mid + large) if m <= 512 else large
    return [MMConfig(bm, bn, bk, group_m=1 if bm <= 16 else 8, num_warps=w, num_stages=st)
            for bm, bn, bk, w, st in tiles]


def _time_with(module, config, fn, device: str) -> float | None:
    """``fn`` timed with ``module.GPU_CONFIGS`` holding ``config`` alone; None if it fails to
    compile or run (too much shared memory, say)."""
    saved = module.GPU_CONFIGS
    module.GPU_CONFIGS = ((1 << 62, config),)
    try:
        return bench(fn, device, graph=True)
    except Exception as e:  # noqa: BLE001 - a candidate that cannot run is recorded, not fatal
        print(f"  {config}: {type(e).__name__}: {str(e)[:120]}", flush=True)
        return None
    finally:
        module.GPU_CONFIGS = saved


def _current(table, m: int):
    return next(c for bound, c in table if m <= bound)


def tune_shape(m: int, k: int, n: int, device: str, dtype: torch.dtype) -> list[dict]:
    from lowbit.backends.triton import gemm, w4a16

    x = torch.randn(m, k, device=device, dtype=dtype)
    w = torch.randn(n, k, device=device, dtype=dtype) / k ** 0.5
    base = bench(lambda: torch.nn.functional.linear(x, w), device, graph=True)
    packed = packed_int4(k, n, device)
    a, b, sa, sb = _int8(m, k, n, device)
    rows = []
    for kernel, module, candidates, fn in (
            ("w4a16_mm", w4a16, w4_candidates(m), lambda: w4a16.w4a16_mm(x, *packed, 128, None)),
            ("scaled_mm", gemm, mm_candidates(m), lambda: gemm.scaled_mm(a, b, sa, sb, None, None, None, dtype))):
        today = _current(module.GPU_CONFIGS, m)
        for cfg in dict.fromkeys([today, *candidates]):
            t = _time_with(module, cfg, fn, device)
            rows.append(dict(kernel=kernel, M=m, K=k, N=n, config=str(cfg).replace(",", ";"), today=cfg == today,
                             ms=t if t is not None else float("nan"), fp16_ms=base,
                             speedup=base / t if t else float("nan")))
    return rows


def best(rows: list[dict]) -> list[str]:
    """Per kernel and M: the candidate with the best worst-case speed-up over the shapes."""
    lines = []
    for kernel in dict.fromkeys(r["kernel"] for r in rows):
        for m in dict.fromkeys(r["M"] for r in rows):
            by_cfg: dict[str, list[float]] = {}
            for r in rows:
                if r["kernel"] == kernel and r["M"] == m:
                    by_cfg.setdefault(r["config"], []).append(r["speedup"])
            scored = {c: min(v) for c, v in by_cfg.items() if all(s == s for s in v)}
            if not scored:
                continue
            top = max(scored, key=scored.get)
            today = next(r["config"] for r in rows if r["kernel"] == kernel and r["M"] == m and r["today"])
            lines.append(f"{kernel} M={m}: best {top} (worst-shape speed-up {scored[top]:.3g}); "
                         f"today {scored.get(today, float('nan')):.3g}")
    return lines


def main() -> None:
    ap = gpu_parser(__doc__, "tune")
    ap.add_argument("--ms", default=None)
    args = ap.parse_args()
    device = run_device(args, "tune_kernels.py")
    dtype = torch.float32 if args.smoke else torch.float16
    shapes = [(256, 64)] if args.smoke else SHAPES
    ms = [int(v) for v in args.ms.split(",")] if args.ms else ([1, 32] if args.smoke else MS)
    print(f"device: {device_name(device)}", flush=True)
    folder = Path(args.out)
    folder.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    for k, n in shapes:
        for m in ms:
            rows += tune_shape(m, k, n, device, dtype)
            write_table(rows, folder, "tune")
            print(f"M={m} K={k} N={n} done", flush=True)
    print("\n".join(best(rows)), flush=True)


if __name__ == "__main__":
    main()
