"""``to_networkx(graph)``: a directed graph of nodes (and graph inputs) for the analyses
networkx does well: reachability, dominators, connected components, drawing."""

from __future__ import annotations

import networkx as nx

from lowbit.ir.graph import Graph, Node, Value


def to_networkx(graph: Graph) -> nx.DiGraph:
    """Nodes are ``Node`` objects and graph-input ``Value`` objects; an edge u→v carries
    ``value`` (the SSA value) and ``index`` (which operand of v it feeds).
    Node attributes: ``op``, ``module`` (location), ``label``."""
    g = nx.DiGraph()
    for v in graph.inputs:
        g.add_node(v, op="input", module="", label=f"%{v.name}")
    for node in graph.nodes:
        g.add_node(node, op=node.op, module=node.loc.module,
                   label=f"{node.op} %{node.results[0].name}" if node.results else node.op)
        for i, v in enumerate(node.operands):
            if v is None:
                continue
            src: Node | Value = v.producer if v.producer is not None else v
            g.add_edge(src, node, value=v, index=i)
    return g
