"""Pattern rules: a named ``match`` that returns the bindings or says why it did not match,
and a ``rewrite`` that edits the graph given those bindings.

    def match_addmm(node, graph):        # -> dict, or a str saying why not
        if not graph.is_constant(node.operands[2]):
            return "the weight is not a constant"
        return {"addmm": node}

    ADDMM = Rule("addmm-to-linear", ("aten.addmm.default",), match_addmm, rewrite_addmm)

``apply_rules`` runs rules to a fixed point; ``why_not`` lists, for each candidate root node,
why a rule did not match there (what ``lowbit inspect --why-not RULE`` prints).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from lowbit.ir.graph import Graph, Node

Bindings = dict[str, object]
MatchFn = Callable[[Node, Graph], "Bindings | str"]
RewriteFn = Callable[[Bindings, Graph], None]


@dataclass(frozen=True)
class Rule:
    name: str
    roots: tuple[str, ...]  # op names a match may start from
    match: MatchFn
    rewrite: RewriteFn


def apply_rules(graph: Graph, rules: Sequence[Rule], pass_name: str, max_rounds: int = 10) -> bool:
    """Apply each rule wherever it matches, until nothing changes. Returns whether any did."""
    by_root: dict[str, list[Rule]] = {}
    for r in rules:
        for op in r.roots:
            by_root.setdefault(op, []).append(r)
    changed = False
    for _ in range(max_rounds):
        round_changed = False
        for node in graph.nodes:
            if node.graph is None:
                continue  # erased by an earlier rewrite this round
            for r in by_root.get(node.op, ()):
                bindings = r.match(node, graph)
                if isinstance(bindings, str):
                    continue
                r.rewrite(bindings, graph)
                round_changed = True
                break
        changed |= round_changed
        if not round_changed:
            break
    if changed:
        from lowbit.passes.cleanup import remove_dead_nodes

        remove_dead_nodes(graph)
    return changed


@dataclass(frozen=True)
class Miss:
    node: Node
    reason: str


def why_not(graph: Graph, rule: Rule, module: str | None = None) -> list[Miss]:
    """Why ``rule`` does not match at each candidate node (optionally under a module path)."""
    misses = []
    for node in graph.nodes:
        if node.op not in rule.roots:
            continue
        if module and not node.loc.module.startswith(module):
            continue
        result = rule.match(node, graph)
        if isinstance(result, str):
            misses.append(Miss(node, result))
    return misses


def replace_with(graph: Graph, old: Node, op: str, operands: list, attrs: dict, pass_name: str) -> Node:
    """Insert ``op`` before ``old``, typed like ``old``'s result, and route old's uses to it
    (``old`` stays until erased or swept as dead)."""
    new = graph.create_node(op, operands, attrs, [old.result.type], old.loc.copy())
    graph.insert(new, before=old)
    new.touch(pass_name)
    graph.replace_value(old.result, new.result)
    return new


def single_user(value, graph: Graph) -> Node | None:
    """The one node using ``value``, if exactly one does and it is not a graph output."""
    users = value.users
    if len(users) != 1 or any(o is value for o in graph.outputs):
        return None
    return users[0]
