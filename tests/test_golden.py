"""Golden-text tests: hand-written IR → pipeline (first line of the file) → expected IR.

Regenerate the expected files with ``pytest tests/test_golden.py --update-golden`` and review
the diff. Each case is also checked numerically: the pipeline is lossless.
"""

from pathlib import Path

import pytest
import torch

from conftest import rel_err, sample_inputs
from lowbit.ir import parse_graph, print_graph, run_graph, verify
from lowbit.passes import run_pipeline

GOLDEN = Path(__file__).parent / "golden"
CASES = sorted(p for p in GOLDEN.glob("*.ir") if not p.name.endswith(".expected.ir"))

# statistics that must be positive for the numbers to mean anything
OVERRIDES = {"features.1.running_var": torch.rand(4, generator=torch.Generator().manual_seed(1)) + 0.5}


def _pipeline(text: str) -> str:
    first = text.splitlines()[0]
    assert first.startswith("// pipeline:"), "a golden input starts with '// pipeline: ...'"
    return first.split(":", 1)[1].strip()


@pytest.mark.parametrize("case", CASES, ids=lambda p: p.stem)
def test_golden(case: Path, update_golden: bool):
    text = case.read_text()
    graph = parse_graph(text, dict(OVERRIDES))
    verify(graph)
    inputs = sample_inputs(graph, {"batch": 2, "seq": 5})
    before = run_graph(graph, inputs)
    records = run_pipeline(graph, _pipeline(text))
    assert all(r.changed for r in records[1:]), "every pass in a golden pipeline must do something"
    verify(graph)
    out = print_graph(graph)
    expected = case.with_suffix(".expected.ir")
    if update_golden or not expected.exists():
        expected.write_text(out)
    assert out == expected.read_text()
    after = run_graph(graph, inputs)
    for a, b in zip(after, before):
        assert rel_err(a, b) < 1e-5
