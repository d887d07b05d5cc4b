"""The GPU check's output files, from its stages' results (``scripts/gpu_check.py`` runs them).

A line of the summary is PASS or FAIL only when its figure was measured on a GPU by a stage
that finished: a smoke run, a stage that failed or ran out of time, or a table without the
rows a figure needs gives "not measured (why)", with any partial value shown beside it. The
figures themselves (which rows, worst case or median, goal) are ``benchmarks/_acceptance.py``'s,
the same the benchmarks print.

    summary = write_all(out, raw, results, Meta(smoke=False, wall_s=250.0, total_s=295, commit="abc123",
                                                pending=[]))
    summary["ok"]    # every stage ran and no line failed
"""

from __future__ import annotations

import json
import os
import re
import xml.etree.ElementTree as ET
from dataclasses import asdict, dataclass
from pathlib import Path

from _acceptance import FIGURES, Figure, measure, read_table

# Everything the check writes: the device machine brings back at most eight files.
OUTPUTS = ("summary.md", "summary.json", "pytest.log", "pytest.xml", "kernels.md", "sparse.md",
           "e2e.md", "plots.svg")
BENCH_TABLES = {"kernels": ("kernels", "hadamard"), "sparse": ("sparse_attention",), "e2e": ("e2e",)}
BENCH_SCRIPTS = {"kernels": "kernels.py", "sparse": "sparse_attention.py", "e2e": "triton_e2e.py"}
PLOTS = ("kernels", "sparse_attention", "e2e")
TABLE_STAGE = {table: stage for stage, tables in BENCH_TABLES.items() for table in tables}
TAIL_LINES = 60


@dataclass(frozen=True)
class StageResult:
    """How one stage ended: OK, FAIL (non-zero exit) or TIMEOUT, and its log's last lines."""

    name: str
    status: str
    rc: int
    wall_s: float
    limit_s: float
    tail: str


@dataclass(frozen=True)
class Meta:
    """About the run: smoke or GPU, time taken and allowed, the commit, stages still to run."""

    smoke: bool
    wall_s: float
    total_s: float
    commit: str
    pending: list[str]


@dataclass(frozen=True)
class Line:
    """One line of the summary's table: PASS, FAIL or "not measured (why)"."""

    name: str
    goal: str
    measured: str
    verdict: str
    value: float | None = None
    median: float | None = None
    n: int = 0
    statistic: str = ""


def tail(path: Path, lines: int = TAIL_LINES) -> str:
    """The last lines of a log (progress bars' carriage returns count as line ends)."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(line[:400] for line in text.splitlines()[-lines:])


def clear_outputs(out: Path) -> None:
    """Remove a previous run's files, so none is mistaken for this run's."""
    for name in OUTPUTS:
        (out / name).unlink(missing_ok=True)


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def environment(raw: Path, results: dict[str, StageResult]) -> dict:
    """The preflight stage's findings (the JSON line it prints last), or why there are none."""
    pre = results.get("preflight")
    log = raw / "preflight.log"
    lines = [ln for ln in (log.read_text(errors="replace") if log.exists() else "").splitlines() if ln.startswith("{")]
    if not lines:
        return {"missing": {"preflight": f"no report ({pre.status if pre else 'not run'})"}}
    return json.loads(lines[-1])


def environment_lines(env: dict, smoke: bool) -> list[Line]:
    missing = env.get("missing", {})
    found = "all imported" if not missing else "; ".join(f"{k}: {v}" for k, v in missing.items())
    lines = [Line("required imports (torch, triton, transformers, onnxruntime, lowbit, ...)", "all import",
                  found, "FAIL" if missing else "PASS")]
    if smoke:
        gpu = Line("CUDA GPU visible to torch", "a GPU", "none (smoke run on the CPU)", "not measured (smoke run)")
    else:
        name = f"{env['gpu']} ({env['capability']}, CUDA {env['cuda_version']})" if env.get("cuda") else "none"
        gpu = Line("CUDA GPU visible to torch", "a GPU", name, "PASS" if env.get("cuda") else "FAIL")
    return lines + [gpu]


def junit_counts(path: Path) -> dict[str, int] | None:
    """passed / failures / errors / skipped from pytest's junit xml (None: absent or unreadable)."""
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return None
    suites = [root] if root.tag == "testsuite" else root.findall("testsuite")
    counts = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    return counts


def pytest_line(out: Path, result: StageResult | None, smoke: bool) -> Line:
    """Every ``-m gpu`` test passes, compiled: none failed, none errored, none skipped."""
    name, goal = "every `-m gpu` test passes, compiled (not interpreted)", "all pass, none skipped"
    counts = junit_counts(out / "pytest.xml") if result else None
    measured = "no junit xml" if counts is None else \
        "{passed} passed, {failures} failed, {errors} errors, {skipped} skipped".format(**counts)
    if smoke:
        return Line(name, goal, measured, "not measured (smoke run)")
    if result is None or result.status == "TIMEOUT" or counts is None:
        why = "stage not run" if result is None else f"pytest: {result.status}"
        return Line(name, goal, measured, f"not measured ({why})")
    ok = result.rc == 0 and counts["passed"] > 0 and not (counts["failures"] or counts["errors"] or counts["skipped"])
    return Line(name, goal, measured, "PASS" if ok else "FAIL", n=counts["tests"])


def figure_line(figure: Figure, raw: Path, results: dict[str, StageResult], smoke: bool) -> Line:
    """An acceptance figure from its benchmark's table, judged only if measured for real."""
    stage = TABLE_STAGE[figure.table]
    result = results.get(stage)
    path = raw / f"{figure.table}.csv"
    m = measure(figure, read_table(path) if path.exists() else [])
    measured = m.value_text() if m.value is not None else "—"
    if smoke:
        verdict, measured = "not measured (smoke run)", "—"
    elif result is None or result.status != "OK":
        verdict = f"not measured ({stage}: {result.status if result else 'stage not run'})"
        measured = f"partial: {measured}" if m.value is not None else measured
    else:
        verdict = {True: "PASS", False: "FAIL", None: "not measured (no rows in the table)"}[m.met]
    return Line(figure.name, m.goal_text(), measured, verdict, m.value, m.median, m.n,
                f"worst case ({figure.statistic})")


def all_lines(out: Path, raw: Path, results: dict[str, StageResult], smoke: bool) -> list[Line]:
    env = environment(raw, results)
    return (environment_lines(env, smoke) + [pytest_line(out, results.get("pytest"), smoke)]
            + [figure_line(f, raw, results, smoke) for f in FIGURES])


def stage_file(raw: Path, result: StageResult) -> str:
    """A benchmark stage's markdown file: its tables (possibly partial) and its log's tail."""
    parts = [f"# {result.name}: {result.status} in {result.wall_s:.0f} s (limit {result.limit_s:.0f} s)", "",
             f"`benchmarks/{BENCH_SCRIPTS[result.name]}`; its plot, if it got that far, is in plots.svg.", ""]
    for table in BENCH_TABLES[result.name]:
        md = raw / f"{table}.md"
        parts += [f"## {table}", "", md.read_text() if md.exists() else "(no table written)", ""]
    parts += [f"## Log (last {TAIL_LINES} lines)", "", "```", result.tail, "```", ""]
    return "\n".join(parts)


def stack_svgs(paths: list[Path]) -> str | None:
    """One SVG holding the given standalone SVGs one above the other (None if there are none)."""
    parts, y, width = [], 0, 0
    for path in paths:
        text = path.read_text()
        head = text[:text.index(">")]
        w, h = (int(re.search(rf'\b{k}="(\d+)"', head).group(1)) for k in ("width", "height"))
        parts.append(text.replace("<svg ", f'<svg x="0" y="{y}" ', 1))
        y, width = y + h, max(width, w)
    if not parts:
        return None
    return "\n".join([f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{y}">', *parts, "</svg>"])


def overall(ok: bool, meta: Meta) -> str:
    if meta.pending:
        return f"INCOMPLETE (still to run: {', '.join(meta.pending)})"
    return "OK" if ok else "FAIL"


def summary_md(lines: list[Line], stages: list[StageResult], env: dict, meta: Meta, ok: bool) -> str:
    mode = "smoke run (CPU, TRITON_INTERPRET=1): nothing is measured" if meta.smoke else "GPU run"
    versions = ", ".join(f"{k} {env.get(k) or '?'}" for k in ("python", "torch", "triton", "transformers",
                                                               "onnxruntime", "numpy", "pytest"))
    out = [f"# lowbit GPU check: {mode}", "",
           f"- GPU: {env.get('gpu') or 'none'}" + (f" ({env['capability']}, CUDA {env['cuda_version']})"
                                                   if env.get("gpu") else ""),
           f"- versions: {versions}",
           f"- kernels: {'interpreted (TRITON_INTERPRET=1)' if env.get('triton_interpret') == '1' else 'compiled'}",
           f"- commit {meta.commit}; wall {meta.wall_s:.0f} s"
           + ("" if meta.smoke else f" (budget {meta.total_s:.0f} s)"),
           f"- overall: {overall(ok, meta)}", "",
           "## Acceptance figures", "",
           "Speed-ups are the worst case over the shapes each goal covers (median beside it); "
           "time ratios and errors their largest.", "",
           "| figure | goal | measured | verdict |", "|---|---|---|---|"]
    out += ["| " + " | ".join(_cell(c) for c in (ln.name, ln.goal, ln.measured, ln.verdict)) + " |" for ln in lines]
    out += ["", "## Stages", "", "| stage | status | wall s | limit s |", "|---|---|---|---|"]
    out += [f"| {r.name} | {r.status} | {r.wall_s:.0f} | {r.limit_s:.0f} |" for r in stages]
    for r in (r for r in stages if r.status != "OK"):
        out += ["", f"### {r.name}: {r.status} (exit {r.rc}), last lines of its log", "", "```",
                "\n".join(r.tail.splitlines()[-30:]), "```"]
    return "\n".join(out) + "\n"


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def write_all(out: Path, raw: Path, stages: list[StageResult], meta: Meta) -> dict:
    """Write the summary, the benchmarks' stage files and the plots into ``out``; return the summary."""
    results = {r.name: r for r in stages}
    for r in stages:
        if r.name in BENCH_TABLES:
            write_atomic(out / f"{r.name}.md", stage_file(raw, r))
    svg = stack_svgs([raw / f"{p}.svg" for p in PLOTS if (raw / f"{p}.svg").exists()])
    if svg:
        write_atomic(out / "plots.svg", svg)
    lines = all_lines(out, raw, results, meta.smoke)
    ok = all(r.status == "OK" for r in stages) and not any(ln.verdict == "FAIL" for ln in lines)
    env = environment(raw, results)
    summary = dict(asdict(meta), ok=ok and not meta.pending, overall=overall(ok, meta), environment=env,
                   stages=[asdict(r) for r in stages], lines=[asdict(ln) for ln in lines])
    write_atomic(out / "summary.json", json.dumps(summary, indent=1, ensure_ascii=False) + "\n")
    write_atomic(out / "summary.md", summary_md(lines, stages, env, meta, ok))
    return summary
