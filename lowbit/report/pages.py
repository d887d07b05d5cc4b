"""The report's pages: static HTML with inline CSS, SVG and a few lines of JavaScript (no
network assets), readable from disk.

The graph is drawn per module group (``model.layers.3``, ``encoder.layer.0``, ...), each a
collapsed ``<details>`` that expands on click, so a 32-layer model opens at once; inside, the
group's nodes are laid out in layers by longest path from the group's inputs (constants are
left out: they are in each node's tooltip, the printed line).
"""

from __future__ import annotations

import html
import re
from collections import Counter

from lowbit.ir.graph import Graph, Node

BOX_W, BOX_H, GAP_X, GAP_Y = 190, 22, 14, 26

CSS = """
body{font-family:system-ui,sans-serif;margin:1.5em;color:#222;max-width:1400px}
table{border-collapse:collapse;margin:.5em 0 1.5em}td,th{border:1px solid #ccc;padding:2px 8px;font-size:13px;text-align:left}
th{background:#f3f3f3}td.num{text-align:right;font-variant-numeric:tabular-nums}
.added{color:#1a7f37}.removed{color:#cf222e}.changed{color:#9a6700}
details.group{border:1px solid #ddd;border-radius:4px;margin:4px 0;padding:2px 8px}
details.group>summary{cursor:pointer;font-family:monospace}
.badge{display:inline-block;border-radius:8px;padding:0 6px;margin-left:6px;font-size:11px;color:#fff}
.badge.added{background:#1a7f37}.badge.changed{background:#bf8700}.badge.removed{background:#cf222e}
rect.node{fill:#f6f8fa;stroke:#8c959f}rect.node.added{fill:#dafbe1;stroke:#1a7f37}
rect.node.changed{fill:#fff8c5;stroke:#bf8700}text{font:11px monospace}line.edge{stroke:#8c959f}
pre{background:#f6f8fa;padding:6px;overflow-x:auto;font-size:12px}
.bar{background:#54aeff;height:10px;display:inline-block}
nav a{margin-right:1em}
"""

JS = """
function setAll(open){document.querySelectorAll('details.group').forEach(d=>{d.open=open;});}
"""


def page(title: str, body: str) -> str:
    return (f"<!DOCTYPE html>\n<html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{CSS}</style><script>{JS}</script></head><body>\n{body}\n</body></html>\n")


def table(rows: list[dict], cls: str = "") -> str:
    if not rows:
        return "<p><em>none</em></p>"
    keys = list(rows[0])
    head = "".join(f"<th>{html.escape(k)}</th>" for k in keys)
    body = "".join("<tr>" + "".join(_cell(r.get(k)) for k in keys) + "</tr>" for r in rows)
    return f"<table class='{cls}'><tr>{head}</tr>{body}</table>"


def _cell(v) -> str:
    if v is None:
        return "<td>—</td>"
    if isinstance(v, float):
        return f"<td class='num'>{v:.3g}</td>"
    if isinstance(v, int):
        return f"<td class='num'>{v}</td>"
    return f"<td>{v if str(v).startswith('<a ') else html.escape(str(v))}</td>"


def histogram(counts: Counter) -> str:
    top = max(counts.values(), default=1)
    rows = "".join(f"<tr><td>{html.escape(op)}</td><td class='num'>{n}</td>"
                   f"<td><span class='bar' style='width:{max(2, 200 * n // top)}px'></span></td></tr>"
                   for op, n in counts.most_common())
    return f"<table class='histogram'><tr><th>op</th><th>count</th><th></th></tr>{rows}</table>"


def group_key(module: str) -> str:
    """The module prefix a node is drawn under: up to the first numbered component
    (``model.layers.3``), else the first two components, else ``(graph)``."""
    if not module:
        return "(graph)"
    parts = module.split(".")
    for i, p in enumerate(parts):
        if re.fullmatch(r"\d+", p):
            return ".".join(parts[: i + 1])
    return ".".join(parts[:2])


def graph_groups(graph: Graph, added: set[str], changed: set[str], lines: dict[str, str]) -> str:
    """Every module group of ``graph`` as a collapsed ``<details>`` holding its SVG; ``added`` and
    ``changed`` name the nodes to highlight; ``lines`` holds each node's printed line (its tooltip)."""
    # a node whose weights (constant operands) a pass moved is drawn as changed too
    changed = changed | {n.results[0].name for n in graph.nodes
                         if any(v is not None and v.producer is not None and v.producer.op == "core.constant"
                                and v.name in changed for v in n.operands)}
    groups: dict[str, list[Node]] = {}
    for node in graph.nodes:
        if node.op != "core.constant":
            groups.setdefault(group_key(node.loc.module or ""), []).append(node)
    out = []
    for key, nodes in groups.items():
        n_add = sum(n.results[0].name in added for n in nodes)
        n_chg = sum(n.results[0].name in changed for n in nodes)
        badges = (f"<span class='badge added'>+{n_add}</span>" if n_add else "") + \
                 (f"<span class='badge changed'>~{n_chg}</span>" if n_chg else "")
        svg = _svg(nodes, added, changed, lambda n: lines[n.results[0].name])
        out.append(f"<details class='group' data-group='{html.escape(key)}'><summary>{html.escape(key)} "
                   f"({len(nodes)} nodes){badges}</summary>{svg}</details>")
    return "\n".join(out)


def _svg(nodes: list[Node], added: set[str], changed: set[str], line) -> str:
    index = {id(n): i for i, n in enumerate(nodes)}
    layer: list[int] = []
    for n in nodes:
        preds = [layer[index[id(v.producer)]] for v in n.operands if v is not None and id(v.producer) in index]
        layer.append(1 + max(preds) if preds else 0)
    slots: Counter = Counter()
    pos = []
    for lv in layer:
        pos.append((slots[lv], lv))
        slots[lv] += 1
    width = (max(slots.values()) if slots else 1) * (BOX_W + GAP_X) + GAP_X
    height = (max(layer) + 1 if layer else 1) * (BOX_H + GAP_Y) + GAP_Y

    def xy(i):
        col, row = pos[i]
        return GAP_X + col * (BOX_W + GAP_X), GAP_Y // 2 + row * (BOX_H + GAP_Y)

    parts = [f"<svg class='graph' xmlns='http://www.w3.org/2000/svg' width='{width}' height='{height}'>"]
    for i, n in enumerate(nodes):
        x1, y1 = xy(i)
        for v in n.operands:
            if v is not None and id(v.producer) in index:
                x0, y0 = xy(index[id(v.producer)])
                parts.append(f"<line class='edge' x1='{x0 + BOX_W // 2}' y1='{y0 + BOX_H}' x2='{x1 + BOX_W // 2}' y2='{y1}'/>")
    for i, n in enumerate(nodes):
        x, y = xy(i)
        state = "added" if n.results[0].name in added else "changed" if n.results[0].name in changed else ""
        label = f"{n.op.split('.', 1)[-1]} %{n.results[0].name}"[:30]
        parts.append(f"<g class='node {state}' data-node='{html.escape(n.results[0].name)}'><title>{html.escape(line(n))}</title>"
                     f"<rect class='node {state}' x='{x}' y='{y}' width='{BOX_W}' height='{BOX_H}' rx='3'/>"
                     f"<text x='{x + 5}' y='{y + 15}'>{html.escape(label)}</text></g>")
    parts.append("</svg>")
    return "".join(parts)
