"""Shared by the ONNX Runtime benchmarks: a CPU session and interleaved median latencies."""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import onnxruntime as ort

from lowbit.backends.onnx.sparse_attention import run


def session(path: Path, threads: int) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # Idle sessions must not spin: with several sessions taking turns on a 2-core machine, the
    # spinning worker threads of the waiting ones steal the cores from the one being timed
    # (measured: +25 ms on every MiniLM run, whichever session).
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def latencies(sessions: dict[str, ort.InferenceSession], feed: dict, warmup: int, runs: int) -> dict[str, float]:
    """Median seconds per run; the sessions take turns so machine noise hits all alike. Models
    with SparseAttention get their key/value caches bound (``run``), inside the timing."""
    times: dict[str, list[float]] = {k: [] for k in sessions}
    for _ in range(warmup):
        for s in sessions.values():
            run(s, feed)
    for _ in range(runs):
        for name, s in sessions.items():
            start = time.perf_counter()
            run(s, feed)
            times[name].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in times.items()}


def op_profile(path: Path, feed: dict, threads: int, runs: int = 10) -> list[tuple[str, float, int]]:
    """Mean milliseconds per run by operator type (and nodes per run), from ONNX Runtime's own
    profiler on the optimized graph, most expensive first."""
    import json
    from collections import Counter

    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.enable_profiling = True
    with tempfile.TemporaryDirectory() as tmp:
        so.profile_file_prefix = str(Path(tmp) / "profile")
        s = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        for _ in range(runs):
            run(s, feed)
        events = json.loads(Path(s.end_profiling()).read_text())
    time, count = Counter(), Counter()
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            time[e["args"]["op_name"]] += e["dur"]
            count[e["args"]["op_name"]] += 1
    return [(op, us / runs / 1000, count[op] // runs) for op, us in time.most_common()]


def add_run_options(ap: argparse.ArgumentParser) -> None:
    """The options every ONNX Runtime latency benchmark takes."""
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--out", help="keep the ONNX files here")


def output_folder(out: str | None, prefix: str) -> Path:
    """``out`` (created), or a fresh temporary folder."""
    folder = Path(out or tempfile.mkdtemp(prefix=prefix)).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    return folder
