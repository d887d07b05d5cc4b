"""scripts/gpu_check.py: the one command a GPU session runs. Here its smoke run on the CPU (every
stage, nothing measured, nothing passed) and its verdicts on tables shaped like a GPU run's."""

import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
sys.path[:0] = [str(ROOT / "scripts"), str(ROOT / "benchmarks")]

import gpu_check  # noqa: E402
import gpu_check_report as report  # noqa: E402
from _acceptance import FIGURES  # noqa: E402

STAGE_FILES = {"kernels.md": ["## kernels", "## hadamard", "| W8A8 scaled_mm |", "| Hadamard + int8 quantize |"],
               "sparse.md": ["## sparse_attention", "| seq | target |"],
               "e2e.md": ["## e2e", "| fp16 eager |", "| lowbit w8a8 (triton) |", "| lowbit w4a16-rtn (triton) |"]}


def _allowed(out: Path) -> None:
    """What the device machine brings back: at most 8 plain files, names of [A-Za-z0-9._-]."""
    files = sorted(p.name for p in out.iterdir())
    assert set(files) <= set(report.OUTPUTS) and len(files) <= 8, files


@pytest.mark.slow
def test_smoke_run_writes_every_file_and_passes_nothing_it_did_not_measure(tmp_path):
    run = subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_check.py"), "--smoke", str(tmp_path)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    _allowed(tmp_path)
    assert set(report.OUTPUTS) <= {p.name for p in tmp_path.iterdir()}
    for name, expected in STAGE_FILES.items():
        text = (tmp_path / name).read_text()
        assert text.startswith(f"# {name[:-3]}: OK") and all(e in text for e in expected), (name, text[:2000])
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["ok"] and summary["smoke"] and [s["status"] for s in summary["stages"]] == ["OK"] * 5
    verdicts = {ln["name"]: ln["verdict"] for ln in summary["lines"]}
    assert verdicts.pop("required imports (torch, triton, transformers, onnxruntime, lowbit, ...)") == "PASS"
    assert set(verdicts) >= {f.name for f in FIGURES} and len(verdicts) == len(FIGURES) + 2
    assert all(v == "not measured (smoke run)" for v in verdicts.values()), verdicts
    md = (tmp_path / "summary.md").read_text()
    assert md.count("| not measured (smoke run) |") == len(FIGURES) + 2
    assert "skipped | not measured" in md and "<svg" in (tmp_path / "plots.svg").read_text()


def _csv(path: Path, rows: list[dict]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def _gpu_like_run(out: Path, raw: Path) -> list:
    env = dict(missing={}, cuda=True, gpu="NVIDIA H200", capability="sm_90", cuda_version="13.0",
               torch="2.11.0", triton="3.6.0", triton_interpret="")
    (raw / "preflight.log").write_text("a warning\n" + json.dumps(env) + "\n")
    (out / "pytest.xml").write_text('<testsuites><testsuite tests="12" failures="0" errors="0" skipped="0"/>'
                                    '</testsuites>')
    _csv(raw / "kernels.csv", [dict(kernel=k, M=m, K=4096, N=4096, ratio=r) for k, m, r in [
        ("W8A8 scaled_mm", 512, 1.6), ("W8A8 scaled_mm", 4096, 1.4), ("W8A8 scaled_mm", 16, 0.5),
        ("W4A16 g128", 1, 3.5), ("W4A16 g128", 16, 3.1)]])
    _csv(raw / "hadamard.csv", [dict(kernel="Hadamard + int8 quantize", M=8192, K=d, time_vs_copy=t)
                                for d, t in [(1024, 1.1), (8192, 1.2)]])
    _csv(raw / "sparse_attention.csv", [dict(seq=16384, target=0.9, speedup=6.0, max_abs_err=1e-3)])
    _csv(raw / "e2e.csv", [dict(model=f"lowbit {r} (triton)", recipe=r, batch=1, seq=s, **{"vs fp16 eager": v})
                           for r, s, v in [("w4a16-rtn", 1, 2.5), ("w8a8", 2048, 1.2)]])
    ok = dict(rc=0, wall_s=1.0, limit_s=60.0, tail="done")
    return [report.StageResult("preflight", "OK", **ok), report.StageResult("pytest", "OK", **ok),
            report.StageResult("kernels", "OK", **ok), report.StageResult("e2e", "OK", **ok),
            report.StageResult("sparse", "TIMEOUT", -9, 45.0, 45.0, "Traceback: killed")]


def test_verdicts_on_a_gpu_like_run(tmp_path):
    out, raw = tmp_path / "out", tmp_path / "raw"
    out.mkdir(), raw.mkdir()
    summary = report.write_all(out, raw, _gpu_like_run(out, raw), report.Meta(False, 200.0, 295, "abc", []))
    lines = {ln["name"]: ln for ln in summary["lines"]}
    verdict = {name: ln["verdict"] for name, ln in lines.items()}
    assert verdict["CUDA GPU visible to torch"] == "PASS"
    assert verdict["every `-m gpu` test passes, compiled (not interpreted)"] == "PASS"
    w8a8 = lines["W8A8 scaled_mm vs cuBLAS fp16, M ≥ 512, 7B/8B shapes"]
    assert (w8a8["verdict"], w8a8["value"], w8a8["n"]) == ("FAIL", 1.4, 2)  # worst case, M < 512 left out
    assert w8a8["measured"] == "1.4 (worst of 2, median 1.5)"
    assert verdict["W4A16 w4a16_mm vs fp16, M ≤ 16"] == "PASS"
    assert verdict["FP8 scaled_mm vs bf16, M ≥ 2048"] == "not measured (no rows in the table)"
    assert lines["fused Hadamard + per-token int8 quantize, time / plain copy"]["value"] == 1.2
    sparse = lines["block-sparse attention at 90%, ≥ 16k tokens, vs SDPA, mask building included"]
    assert (sparse["verdict"], sparse["measured"]) == ("not measured (sparse: TIMEOUT)", "partial: 6 (one measurement)")
    assert verdict["end to end: w4a16 decode of 1 token vs fp16 eager"] == "PASS"
    assert verdict["end to end: w8a8 prefill of 2048 tokens vs fp16 eager"] == "FAIL"
    assert not summary["ok"]
    md = (out / "summary.md").read_text()
    assert "- GPU: NVIDIA H200 (sm_90, CUDA 13.0)" in md and "### sparse: TIMEOUT" in md
    assert "max \\|error\\|" in md and "partial: 6" in (out / "summary.md").read_text()
    assert (out / "sparse.md").read_text().startswith("# sparse: TIMEOUT")
    _allowed(out)


def test_failed_tests_and_missing_imports_fail(tmp_path):
    out, raw = tmp_path / "out", tmp_path / "raw"
    out.mkdir(), raw.mkdir()
    (raw / "preflight.log").write_text(json.dumps(dict(missing={"lowbit": "ModuleNotFoundError: x"}, cuda=False)))
    (out / "pytest.xml").write_text('<testsuite tests="3" failures="1" errors="0" skipped="1"/>')
    stages = [report.StageResult("preflight", "OK", 0, 1.0, 9.0, ""),
              report.StageResult("pytest", "FAIL", 1, 1.0, 9.0, "")]
    summary = report.write_all(out, raw, stages, report.Meta(False, 1.0, 295, "x", ["kernels"]))
    assert not summary["ok"] and summary["overall"] == "INCOMPLETE (still to run: kernels)"
    lines = {ln["name"]: ln for ln in summary["lines"]}
    assert lines["required imports (torch, triton, transformers, onnxruntime, lowbit, ...)"]["verdict"] == "FAIL"
    assert lines["CUDA GPU visible to torch"]["verdict"] == "FAIL"
    tests = lines["every `-m gpu` test passes, compiled (not interpreted)"]
    assert (tests["verdict"], tests["measured"]) == ("FAIL", "1 passed, 1 failed, 0 errors, 1 skipped")
    assert lines["W8A8 scaled_mm vs cuBLAS fp16, M ≥ 512, 7B/8B shapes"]["verdict"] == \
        "not measured (kernels: stage not run)"


def test_unused_time_goes_to_later_stages_and_stages_are_checked(tmp_path):
    run = gpu_check.Run(tmp_path, tmp_path, False, time.monotonic() + 200, 0, {})
    later = [gpu_check.Stage("e2e", 70, "triton_e2e.py")]
    assert gpu_check.time_limit(gpu_check.Stage("kernels", 60, "kernels.py"), later, run) == pytest.approx(130, abs=2)
    assert [s.name for s in gpu_check.selected("e2e")] == ["preflight", "e2e"]
    with pytest.raises(SystemExit, match="unknown stage"):
        gpu_check.selected("kernel")
    env = gpu_check.stage_env(smoke=False)
    assert "TRITON_INTERPRET" not in env and env["PYTHONPATH"].split(os.pathsep)[0] == str(ROOT)
