"""The browsable inspection report: ``lowbit inspect MODEL --recipe R --report DIR``.

    report = Report(quality=None)
    traced, records = lowbit.api.build(model, example, recipe="w8a8", calibration=batches,
                                       observer=report.observer)
    report.write("out/report", title="minilm w8a8", records=records, notes=traced.notes)

writes ``index.html`` (the pipeline: per pass time, nodes before/after, parameter bytes, drift,
quality), ``pass-NN.html`` per pass (graph by module group with the diff highlighted, op
histogram, quantization table, constants moved), ``ir/NN-<pass>.ir`` (the printed graph) and
``summary.json`` (schema in ``docs/inspect.md``). The folder is written next to its final place
and renamed into it, so a failed run leaves nothing half written.
"""

from __future__ import annotations

import html
import json
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from lowbit.errors import LowbitError
from lowbit.ir.graph import Graph
from lowbit.ir.printer import print_graph
from lowbit.report import snapshot as snap
from lowbit.report.pages import graph_groups, histogram, page, table

SCHEMA_VERSION = 1
QualityFn = Callable[[Graph, object], tuple[str, float]]  # (graph, traced model) → (label, value)


class Report:
    """Collects what each pass did (as the pass manager's observer) and writes the report."""

    def __init__(self, quality: QualityFn | None = None):
        self.quality = quality
        self.passes: list[dict] = []
        self._last: snap.Snapshot | None = None
        self._float_weights: dict = {}
        self._samples = None
        self._traced = None
        self._digests = snap.Digests()

    def observer(self, traced, samples):
        self._traced, self._samples = traced, samples
        return self._observe

    def _observe(self, index: int, record, graph: Graph) -> None:
        self._float_weights.update(snap.float_weights_of(graph))
        cur = snap.take(graph, index, record.name, self._digests)
        prev = self._last
        d = snap.diff(prev, cur) if prev else snap.Diff((), (), ())
        quantized = any(v.op.startswith("quant.") for v in cur.nodes.values())
        if quantized and prev is not None and not record.changed:
            quant = self.passes[-1]["quant"]
        else:
            quant = snap.quant_rows(graph, self._samples, self._float_weights) if quantized else []
        label, value = self.quality(graph, self._traced) if self.quality and (record.changed or index == 0) else (None, None)
        if value is None and self.passes:
            label, value = self.passes[-1]["quality_label"], self.passes[-1]["quality"]
        self.passes.append({
            "index": index, "name": record.name, "seconds": record.seconds, "changed": record.changed,
            "nodes_before": len(prev.nodes) if prev else len(cur.nodes), "nodes_after": len(cur.nodes),
            "param_bytes": record.param_bytes, "drift": record.drift, "quality_label": label, "quality": value,
            "diff": d, "quant": quant, "histogram": cur.histogram(), "ir": print_graph(graph, self._digests),
            "moved": snap.moved_constants(prev, cur, snap.constant_readers(graph)) if prev else [],
            "removed_lines": [prev.nodes[n].line for n in d.removed] if prev else [],
            "changed_lines": [(prev.nodes[n].line, cur.nodes[n].line) for n in d.changed] if prev else [],
            "added_lines": [cur.nodes[n].line for n in d.added],
            "groups": graph_groups(graph, set(d.added), set(d.changed),
                                   {name: v.line for name, v in cur.nodes.items()}),
        })
        self._last = cur

    def write(self, folder: str | Path, title: str, notes: list[str] | None = None) -> Path:
        folder = Path(folder)
        if folder.is_dir() and any(folder.iterdir()) and not (folder / "summary.json").is_file():
            raise LowbitError(f"{folder} exists and does not hold a lowbit report: choose an empty or new folder")
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
        try:
            (tmp / "ir").mkdir()
            for p in self.passes:
                (tmp / "ir" / _ir_name(p)).write_text(p["ir"])
                (tmp / _page_name(p)).write_text(self._pass_page(p, title))
            (tmp / "index.html").write_text(self._index(title, notes or []))
            (tmp / "summary.json").write_text(json.dumps(self.summary(title, notes or []), indent=1))
            if folder.exists():
                shutil.rmtree(folder)
            tmp.rename(folder)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return folder

    def summary(self, title: str, notes: list[str]) -> dict:
        keys = ("index", "name", "seconds", "changed", "nodes_before", "nodes_after", "param_bytes", "drift",
                "quality_label", "quality")
        return {"schema": SCHEMA_VERSION, "title": title, "notes": notes, "passes": [
            {**{k: p[k] for k in keys}, "added": list(p["diff"].added), "removed": list(p["diff"].removed),
             "changed_nodes": list(p["diff"].changed), "ops": dict(p["histogram"]), "quantized": p["quant"],
             "moved": p["moved"], "ir": f"ir/{_ir_name(p)}", "page": _page_name(p)} for p in self.passes]}

    def _index(self, title: str, notes: list[str]) -> str:
        rows = [{"#": p["index"], "pass": f"<a href='{_page_name(p)}'>{html.escape(p['name'])}</a>",
                 "time ms": 1e3 * p["seconds"], "nodes": f"{p['nodes_before']} → {p['nodes_after']}",
                 "+/−/~": _counts(p["diff"]), "params": _bytes(p["param_bytes"]), "drift": p["drift"],
                 (self.passes[0]["quality_label"] or "quality"): p["quality"]} for p in self.passes]
        body = (f"<h1>{html.escape(title)}</h1><p>{len(self.passes) - 1} passes. Drift: relative L2 error of "
                "the outputs against the original model on the example inputs.</p>" + table(rows, "pipeline"))
        if notes:
            body += "<h2>Notes</h2><ul>" + "".join(f"<li>{html.escape(n)}</li>" for n in notes) + "</ul>"
        return page(title, body + "<p><a href='summary.json'>summary.json</a> · printed graphs in <code>ir/</code></p>")

    def _pass_page(self, p: dict, title: str) -> str:
        i, n = p["index"], len(self.passes)
        nav = "<nav><a href='index.html'>pipeline</a>" + \
              (f"<a href='{_page_name(self.passes[i - 1])}'>← previous</a>" if i > 0 else "") + \
              (f"<a href='{_page_name(self.passes[i + 1])}'>next →</a>" if i + 1 < n else "") + "</nav>"
        stats = [{"time ms": 1e3 * p["seconds"], "nodes before": p["nodes_before"], "nodes after": p["nodes_after"],
                  "params": _bytes(p["param_bytes"]), "drift": p["drift"], "added": len(p["diff"].added),
                  "removed": len(p["diff"].removed), "changed": len(p["diff"].changed)}]
        body = [nav, f"<h1>{i}. {html.escape(p['name'])}</h1><p>{html.escape(title)}</p>", table(stats, "stats"),
                "<h2>Graph</h2><p><button onclick='setAll(true)'>expand all</button> "
                "<button onclick='setAll(false)'>collapse all</button> "
                "<span class='added'>added</span> · <span class='changed'>changed</span> (hover a node for its line)</p>",
                f"<div id='graph'>{p['groups']}</div>", "<h2>Diff against the previous pass</h2>", _diff_html(p),
                "<h2>Constants moved</h2>", table(p["moved"], "moved"),
                "<h2>Quantized tensors</h2>", table(p["quant"], "quant"),
                "<h2>Ops</h2>", histogram(p["histogram"]),
                f"<p>Printed graph: <a href='ir/{_ir_name(p)}'>ir/{_ir_name(p)}</a></p>"]
        return page(f"{i}. {p['name']} — {title}", "\n".join(body))


def _diff_html(p: dict) -> str:
    def lines(cls, items):
        return f"<pre class='{cls}'>" + "\n".join(html.escape(x) for x in items) + "</pre>" if items else ""

    changed = [f"- {a}\n+ {b}" for a, b in p["changed_lines"]]
    out = (f"<h3 class='added'>added ({len(p['added_lines'])})</h3>" + lines("added", p["added_lines"][:500]) +
           f"<h3 class='removed'>removed ({len(p['removed_lines'])})</h3>" + lines("removed", p["removed_lines"][:500]) +
           f"<h3 class='changed'>changed ({len(changed)})</h3>" + lines("changed", changed[:500]))
    return out


def _counts(d: snap.Diff) -> str:
    return f"+{len(d.added)} −{len(d.removed)} ~{len(d.changed)}"


def _bytes(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 1e6 else f"{n / 1e3:.1f} KB"


def _page_name(p: dict) -> str:
    return f"pass-{p['index']:02d}.html"


def _ir_name(p: dict) -> str:
    return f"{p['index']:02d}-{p['name'].split('{')[0]}.ir"


__all__ = ["Report"]
