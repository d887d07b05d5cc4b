"""One command for a GPU session: the kernel tests compiled, the three GPU benchmarks, and a
summary of the acceptance figures with PASS/FAIL, all in one folder, in under five minutes.

    bash scripts/gpu_check.sh [OUT_DIR]            # on a CUDA GPU
    bash scripts/gpu_check.sh --smoke [OUT_DIR]    # tiny sizes on the CPU (TRITON_INTERPRET=1)

OUT_DIR defaults to ``$OUT``, else ``./gpu_check_out``. Runs from a checkout without
installing lowbit (the stages get the repository on ``PYTHONPATH``) and needs only torch,
triton, transformers, onnxruntime, numpy and pytest (plus lowbit's own dependencies, which a
preflight stage imports first and reports). Stages, each a subprocess with its own time
limit (a stage's unused time goes to the later ones; one that fails or runs out of time is
recorded with its log tail and the next one starts):

    preflight   imports, versions, the GPU's name
    pytest      ``pytest -m gpu`` (kernels compiled: TRITON_INTERPRET unset; skipped in smoke)
    kernels     benchmarks/kernels.py            W8A8 / W4A16 / FP8 GEMMs, Hadamard + quantize
    sparse      benchmarks/sparse_attention.py   block-sparse attention vs SDPA, 4k–64k tokens
    e2e         benchmarks/triton_e2e.py         Llama-shaped model vs fp16 eager, CUDA graphs

Writes eight files at most (what the device machine brings back): summary.md, summary.json,
pytest.log, pytest.xml, kernels.md, sparse.md, e2e.md (each table with its stage's log tail)
and plots.svg (the benchmarks' plots stacked). Exit status 0 when every stage ran and no
figure failed. ``scripts/gpu_check_report.py`` computes the figures and writes the files.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "scripts"), str(ROOT / "benchmarks")]

import gpu_check_report as report  # noqa: E402

# What the stages import. lowbit's dependencies are listed so a missing one is named here
# rather than deep in a stage's traceback.
REQUIRED = ("torch", "triton", "transformers", "onnxruntime", "numpy", "pytest", "onnx", "onnxscript",
            "networkx", "sympy", "safetensors", "tqdm", "yaml", "lowbit", "lowbit.backends.triton.gemm",
            "lowbit.backends.triton.w4a16", "lowbit.backends.triton.quantize",
            "lowbit.backends.triton.attention")
VERSIONS = ("torch", "triton", "transformers", "onnxruntime", "numpy", "pytest")


@dataclass(frozen=True)
class Stage:
    """One step of the check: a subprocess with a time budget on a GPU (seconds)."""

    name: str
    budget_s: float
    script: str = ""  # benchmarks/<script>; empty for the stages run otherwise


STAGES = (
    Stage("preflight", 30),
    Stage("pytest", 85),
    Stage("kernels", 60, "kernels.py"),
    Stage("sparse", 45, "sparse_attention.py"),
    Stage("e2e", 70, "triton_e2e.py"),
)
TOTAL_S = 295  # the budgets above plus time to write the summary; five minutes in all
SMOKE_BUDGET_S = 150  # per stage on the CPU: a check that the scripts run, not a timing


@dataclass(frozen=True)
class Run:
    """Where and how this check runs."""

    out: Path  # the output folder (the eight files)
    raw: Path  # a scratch folder for the benchmarks' tables, plots and logs
    smoke: bool
    deadline: float  # time.monotonic() by which every stage has ended
    workers: int  # pytest-xdist workers, 0 for none
    env: dict[str, str]


def stage_env(smoke: bool) -> dict[str, str]:
    """The stages' environment: the repository importable, nothing downloaded; kernels
    compiled on a GPU, interpreted on the CPU in a smoke run."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1")
    env.pop("LOWBIT_TRITON", None)
    if smoke:
        env.update(TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="")
    else:
        env.pop("TRITON_INTERPRET", None)
    return env


def command(stage: Stage, run: Run) -> list[str]:
    """The argv of a stage."""
    py = sys.executable
    if stage.name == "preflight":
        return [py, str(Path(__file__).resolve()), "--probe"]
    if stage.name == "pytest":
        argv = [py, "-m", "pytest", "-m", "gpu", "-p", "no:cacheprovider", "-q", "-rfEs",
                f"--junitxml={run.out / 'pytest.xml'}", "tests"]
        return argv + (["-n", str(run.workers)] if run.workers else [])
    argv = [py, str(ROOT / "benchmarks" / stage.script), "--out", str(run.raw)]
    return argv + (["--smoke"] if run.smoke else [])


def log_path(stage: Stage, run: Run) -> Path:
    return run.out / "pytest.log" if stage.name == "pytest" else run.raw / f"{stage.name}.log"


def time_limit(stage: Stage, later: list[Stage], run: Run) -> float:
    """The stage's budget plus whatever earlier stages left unused, keeping the later ones' budgets."""
    if run.smoke:
        return SMOKE_BUDGET_S
    reserved = sum(s.budget_s for s in later)
    return max(5.0, run.deadline - time.monotonic() - reserved)


def run_stage(stage: Stage, limit: float, run: Run) -> report.StageResult:
    """Run one stage in its own process group, killed whole (pytest-xdist workers too) when it
    outlasts ``limit`` or when this script is stopped."""
    log = log_path(stage, run)
    start = time.monotonic()
    with open(log, "w") as f:
        proc = subprocess.Popen(command(stage, run), cwd=ROOT, env=run.env, stdout=f,
                                stderr=subprocess.STDOUT, preexec_fn=os.setpgrp)
        try:
            rc = proc.wait(timeout=limit)
            status = "OK" if rc == 0 else "FAIL"
        except subprocess.TimeoutExpired:
            rc, status = _kill(proc), "TIMEOUT"
        finally:
            if proc.poll() is None:
                _kill(proc)
    wall = time.monotonic() - start
    print(f"[gpu_check] {stage.name}: {status} in {wall:.0f} s (limit {limit:.0f} s)", flush=True)
    return report.StageResult(stage.name, status, rc, wall, limit, report.tail(log))


def _kill(proc: subprocess.Popen) -> int:
    os.killpg(proc.pid, signal.SIGKILL)
    return proc.wait()


def run_all(stages: list[Stage], run: Run, total_s: float) -> dict:
    """Run the stages in order; the summary is rewritten after each, so a check stopped from
    outside still leaves what it measured (marked incomplete)."""
    results: list[report.StageResult] = []
    start, commit = time.monotonic(), git_commit()
    for i, stage in enumerate(stages):
        results.append(run_stage(stage, time_limit(stage, stages[i + 1:], run), run))
        meta = report.Meta(run.smoke, time.monotonic() - start, total_s, commit, [s.name for s in stages[i + 1:]])
        summary = report.write_all(run.out, run.raw, results, meta)
    return summary


def probe() -> dict:
    """Imports, versions and the GPU, as the stages see them (run as the preflight stage)."""
    info: dict = {"python": platform.python_version(), "missing": {},
                  "triton_interpret": os.environ.get("TRITON_INTERPRET", "")}
    for name in REQUIRED:
        try:
            importlib.import_module(name)
        except Exception as e:  # noqa: BLE001 - any import failure is the finding
            info["missing"][name] = f"{type(e).__name__}: {e}"
    for name in VERSIONS:
        module = sys.modules.get(name)
        info[name] = getattr(module, "__version__", None) if module else None
    torch = sys.modules.get("torch")
    info["cuda"] = bool(torch and torch.cuda.is_available())
    if info["cuda"]:
        info["gpu"] = torch.cuda.get_device_name()
        info["capability"] = "sm_%d%d" % torch.cuda.get_device_capability()
        info["cuda_version"] = torch.version.cuda
    return info


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", nargs="?", help="output folder (default $OUT, else ./gpu_check_out)")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU under TRITON_INTERPRET=1")
    ap.add_argument("--stages", default=",".join(s.name for s in STAGES),
                    help="comma-separated stages to run (preflight always runs)")
    ap.add_argument("--total", type=float, default=TOTAL_S, help="seconds for the whole check on a GPU")
    ap.add_argument("--workers", type=int, default=None,
                    help="pytest-xdist workers (default 8 on a GPU when pytest-xdist is installed, else 0)")
    ap.add_argument("--probe", action="store_true", help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def make_run(args: argparse.Namespace) -> Run:
    out = Path(args.out or os.environ.get("OUT") or "gpu_check_out").resolve()
    out.mkdir(parents=True, exist_ok=True)
    report.clear_outputs(out)
    workers = args.workers
    if workers is None:
        workers = 8 if not args.smoke and importlib.util.find_spec("xdist") else 0
    return Run(out, Path(tempfile.mkdtemp(prefix="gpu_check_")), args.smoke,
               time.monotonic() + args.total, workers, stage_env(args.smoke))


def selected(names: str) -> list[Stage]:
    wanted = {n.strip() for n in names.split(",")} | {"preflight"}
    unknown = wanted - {s.name for s in STAGES}
    if unknown:
        raise SystemExit(f"unknown stage(s) {sorted(unknown)}; stages: {[s.name for s in STAGES]}")
    return [s for s in STAGES if s.name in wanted]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.probe:
        print(json.dumps(probe()))
        return 0
    stages = selected(args.stages)
    run = make_run(args)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwinds through run_stage's cleanup
    print(f"[gpu_check] {'smoke run' if run.smoke else 'GPU run'} into {run.out}", flush=True)
    try:
        summary = run_all(stages, run, args.total)
    finally:
        shutil.rmtree(run.raw, ignore_errors=True)
    print((run.out / "summary.md").read_text(), flush=True)
    return 0 if summary["ok"] else 1


def git_commit() -> str:
    """The checkout's commit ('unknown' where the tree was copied without its .git), marked when
    tracked files differ from it (a working tree copied over an older checkout's .git)."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    if head.returncode != 0:
        return "unknown"
    return head.stdout.strip() + (" + changes not committed there" if dirty.stdout.strip() else "")


if __name__ == "__main__":
    sys.exit(main())
