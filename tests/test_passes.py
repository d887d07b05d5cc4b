"""Pass infrastructure: pipeline strings, the pass manager (verify, dumps, timing, drift,
the lossless check that names the pass that broke equivalence), and why-not reasons."""

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import pytest
import torch

from lowbit.errors import PassError, PipelineError
from lowbit.ir import parse_graph
from lowbit.passes import PASSES, Pass, PassManager, parse_pipeline
from lowbit.passes.canonicalize import FUSE_ATTENTION, FUSE_RMS_NORM
from lowbit.passes.cleanup import FoldConstants
from lowbit.passes.rewriter import why_not

GOLDEN = Path(__file__).parent / "golden"


def test_pipeline_parses_options_and_aliases():
    passes = parse_pipeline("canonicalize, fold-constants{max_elements=16}")
    assert passes[0].name == "remove-identities" and passes[-1] == FoldConstants(max_elements=16)
    assert str(passes[-1]) == "fold-constants{max_elements=16}"


@pytest.mark.parametrize("text, message, caret", [
    ("canonicalize,fold-constants{max_elements=16", "expected ',' or '}'", 43),
    ("canonicalize,,eliminate-dead-code", "expected a pass name", 13),
    ("fold-constants{max_elements}", "expected '='", 27),
    ("fold-constants{max_elements=many}", "'many' is not a valid int", 15),
])
def test_malformed_pipeline_points_at_token(text, message, caret):
    with pytest.raises(PipelineError) as e:
        parse_pipeline(text)
    msg = str(e.value)
    assert message in msg
    assert msg.splitlines()[-1] == "  " + " " * caret + "^"


def test_unknown_pass_suggests_close_names():
    with pytest.raises(PipelineError, match=r"unknown pass 'fold-constant' \(did you mean fold-constants"):
        parse_pipeline("canonicalize,fold-constant")
    with pytest.raises(PipelineError, match="has no option 'max_element' .did you mean max_elements"):
        parse_pipeline("fold-constants{max_element=3}")


@dataclass(frozen=True)
class _BreakLinearBias(Pass):
    """A deliberately wrong 'lossless' pass, to check the manager catches and names it."""

    name: ClassVar[str] = "test-break-linear"

    def run(self, graph, ctx):
        for node in graph.nodes:
            if node.op == "core.linear":
                w = node.operand(1)
                graph.set_tensor(w, graph.tensor(w) * 1.5)
                return True
        return False


def _graph():
    return parse_graph((GOLDEN / "cleanup.ir").read_text())


def test_manager_records_dumps_and_drift(tmp_path):
    g = _graph()
    x = [torch.randn(4, 8)]
    records = PassManager(parse_pipeline("canonicalize"), dump_dir=tmp_path, sample_inputs=x).run(g)
    assert [r.name for r in records][:2] == ["input", "remove-identities"]
    assert all(r.drift is not None and r.drift < 1e-6 for r in records)
    assert records[-1].nodes < records[0].nodes
    dumps = sorted(p.name for p in tmp_path.iterdir())
    assert dumps[0] == "00-input.ir" and dumps[-1] == f"{len(records) - 1:02d}-eliminate-dead-code.ir"
    assert "core.linear" in (tmp_path / dumps[-1]).read_text()


def test_broken_lossless_pass_is_named_and_graph_written(tmp_path):
    g = _graph()
    manager = PassManager([*parse_pipeline("fold-constants"), _BreakLinearBias()], dump_dir=tmp_path,
                          sample_inputs=[torch.randn(4, 8)])
    with pytest.raises(PassError) as e:
        manager.run(g)
    msg = str(e.value)
    assert "pass test-break-linear failed" in msg and "lossless pass changed the outputs" in msg
    failed = tmp_path / "02-test-break-linear.failed.ir"
    assert failed.exists() and str(failed) in msg


def test_pass_that_breaks_the_graph_is_named(tmp_path):
    @dataclass(frozen=True)
    class _Corrupt(Pass):
        name: ClassVar[str] = "test-corrupt"

        def run(self, graph, ctx):
            node = next(n for n in graph.nodes if n.op == "core.relu")
            node.attrs["dim"] = 3
            return True

    with pytest.raises(PassError, match="pass test-corrupt failed: unknown attribute 'dim'"):
        PassManager([_Corrupt()], dump_dir=tmp_path).run(_graph())
    assert (tmp_path / "01-test-corrupt.failed.ir").exists()


def test_why_not_explains_misses():
    text = (GOLDEN / "attention.ir").read_text().replace("core.softmax(%masked) {dim=-1}",
                                                         "core.softmax(%masked) {dim=2}")
    misses = why_not(parse_graph(text), FUSE_ATTENTION)
    assert [m.reason for m in misses] == ["softmax is not over the last dim"]
    text = (GOLDEN / "rms_norm.ir").read_text().replace("aten.pow.Tensor_Scalar(%xf, 2)",
                                                        "aten.pow.Tensor_Scalar(%xf, 3)")
    misses = why_not(parse_graph(text), FUSE_RMS_NORM, module="model.norm")
    assert [m.reason for m in misses] == ["the mean is not over x²"]


def test_every_pass_has_a_summary():
    for name, cls in PASSES.items():
        assert cls.summary, f"{name} has no summary"


class _SliceToLength(torch.nn.Module):
    def forward(self, x, y):
        return x[:, : y.shape[1]] * 2  # a slice whose end is the (symbolic) length it already has


def test_remove_identities_on_a_slice_to_a_symbolic_end():
    from lowbit.frontend import trace

    x, y = torch.randn(2, 6), torch.randn(2, 6)
    traced = trace(_SliceToLength(), (x, y), dynamic_shapes={"x": {1: "seq"}, "y": {1: "seq"}},
                   canonicalize=False)
    assert any(n.op == "aten.slice.Tensor" for n in traced.graph.nodes)
    PassManager(parse_pipeline("remove-identities")).run(traced.graph)
    assert not any(n.op == "aten.slice.Tensor" for n in traced.graph.nodes), traced.graph
