"""Shared by the kernel benchmarks: timing on CUDA (or on the CPU for a smoke run), result
tables, and a small SVG plot with no plotting library needed."""

from __future__ import annotations

import argparse
import csv
import html
import math
import time
from pathlib import Path

import torch


def device_name(device: str) -> str:
    return torch.cuda.get_device_name() if device == "cuda" else "cpu (smoke run: no speed figures)"


def gpu_parser(doc: str, out: str, smoke: str = "tiny shapes on the CPU (no speed figures)") -> argparse.ArgumentParser:
    """A GPU benchmark's options: ``--out`` (default ``out``) and ``--smoke``."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--out", default=out, help="folder for the tables and the plot")
    ap.add_argument("--smoke", action="store_true", help=smoke)
    return ap


def run_device(args: argparse.Namespace, script: str) -> str:
    """"cpu" for a smoke run, else "cuda", refused with a message where there is no GPU."""
    if args.smoke:
        return "cpu"
    if not torch.cuda.is_available():
        raise SystemExit(f"benchmarks/{script} needs a CUDA GPU (use --smoke to check the script on a CPU)")
    return "cuda"


def bench(fn, device: str, reps: int = 50, graph: bool = False) -> float:
    """Median milliseconds per call: CUDA events around each call after warm-up (``do_bench``
    clears the L2 cache before each call). ``graph``: ``fn`` captured once in a CUDA graph and
    each call a replay, after the same L2 flush, so the kernels are timed without the Python and
    launch overhead of eager calls (what a model run in CUDA graphs sees). On the CPU (``--smoke``
    runs, which check the scripts and time nothing worth reading) one call after the warm-up."""
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
        if graph:
            return _bench_graph(fn, reps)
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=25, rep=reps * 2, return_mode="median"))
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def _bench_graph(fn, reps: int) -> float:
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    flush = torch.empty(64 * 2**20, dtype=torch.int32, device="cuda")  # 256 MB, past the L2
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    for _ in range(3):
        graph.replay()
    for start, end in events:
        flush.zero_()
        start.record()
        graph.replay()
        end.record()
    torch.cuda.synchronize()
    times = sorted(start.elapsed_time(end) for start, end in events)
    return float(times[len(times) // 2])


def write_table(rows: list[dict], folder: Path, name: str) -> None:
    """``name``.csv and ``name``.md in ``folder``."""
    if not rows:
        return
    keys = list(rows[0])
    with open(folder / f"{name}.csv", "w", newline="") as f:
        w = csv.DictWriter(f, keys)
        w.writeheader()
        w.writerows(rows)
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(_fmt(r[k]) for k in keys) + " |" for r in rows]
    (folder / f"{name}.md").write_text("\n".join(lines) + "\n")


def _fmt(v) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def svg_lines(series: dict[str, list[tuple[float, float]]], path: Path, title: str,
              xlabel: str, ylabel: str, log_x: bool = True, hline: float | None = 1.0) -> None:
    """A line plot (one line per series) as a standalone SVG file."""
    w, h, pad = 720, 420, 60
    pts = [p for s in series.values() for p in s]
    if not pts:
        return
    fx = (lambda x: math.log2(x)) if log_x else (lambda x: x)
    xs, ys = [fx(x) for x, _ in pts], [y for _, y in pts] + ([hline] if hline else [])
    x0, x1, y0, y1 = min(xs), max(xs) or 1, 0.0, max(ys) * 1.1
    x1 = x1 if x1 > x0 else x0 + 1

    def sx(x):
        return pad + (fx(x) - x0) / (x1 - x0) * (w - 2 * pad)

    def sy(y):
        return h - pad - (y - y0) / (y1 - y0) * (h - 2 * pad)

    colors = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf"]
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">',
           f'<text x="{w / 2}" y="20" text-anchor="middle" font-size="14">{html.escape(title)}</text>',
           f'<text x="{w / 2}" y="{h - 15}" text-anchor="middle">{html.escape(xlabel)}</text>',
           f'<text x="15" y="{h / 2}" transform="rotate(-90 15 {h / 2})" text-anchor="middle">{html.escape(ylabel)}</text>',
           f'<line x1="{pad}" y1="{h - pad}" x2="{w - pad}" y2="{h - pad}" stroke="black"/>',
           f'<line x1="{pad}" y1="{pad}" x2="{pad}" y2="{h - pad}" stroke="black"/>']
    for x in sorted({x for x, _ in pts}):
        out.append(f'<text x="{sx(x):.1f}" y="{h - pad + 15}" text-anchor="middle">{x:g}</text>')
    for i in range(5):
        y = y0 + (y1 - y0) * i / 4
        out.append(f'<text x="{pad - 5}" y="{sy(y) + 4:.1f}" text-anchor="end">{y:.2g}</text>')
    if hline:
        out.append(f'<line x1="{pad}" y1="{sy(hline):.1f}" x2="{w - pad}" y2="{sy(hline):.1f}" stroke="gray" stroke-dasharray="4"/>')
    for i, (name, s) in enumerate(series.items()):
        c = colors[i % len(colors)]
        path_d = " ".join(f"{'M' if j == 0 else 'L'}{sx(x):.1f},{sy(y):.1f}" for j, (x, y) in enumerate(sorted(s)))
        out.append(f'<path d="{path_d}" fill="none" stroke="{c}" stroke-width="2"/>')
        out.append(f'<text x="{w - pad + 5 - 160}" y="{pad + 15 * i}" fill="{c}">{html.escape(name)}</text>')
    out.append("</svg>")
    path.write_text("\n".join(out))
