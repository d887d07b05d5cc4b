"""benchmarks/peers_llm_draws.py: the calibration draws are the windows the peers' runners cut,
and the report's verdict follows the paired differences."""

import sys
from pathlib import Path

import pytest
import torch

from lowbit.evaluate import byte_windows

# benchmarks/ holds scripts named like packages (kernels.py, hadamard.py): on the path only
# while these three are imported, so no later import in the session finds them
BENCH = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path[:0] = [str(BENCH), str(BENCH / "peers")]
try:
    import peers_llm
    import peers_llm_draws
    from _common import windows
finally:
    del sys.path[:2]


def test_draw_zero_is_the_calibration_set_of_lowbit_eval():
    ours = peers_llm.calibration_windows(0)
    assert [b[0].shape for b in ours] == [b[0].shape for b in byte_windows("calib")]
    assert all(torch.equal(a[0], b[0]) for a, b in zip(ours, byte_windows("calib")))


@pytest.mark.parametrize("offset", [51, 255])
def test_other_draws_cut_windows_elsewhere_in_the_same_text(offset):
    ids = torch.cat([b[0] for b in peers_llm.calibration_windows(offset)])
    text = peers_llm.CALIB.read_bytes()
    assert len(ids) == (len(text) - offset) // 256
    assert bytes(ids[0].tolist()) == text[offset:offset + 256]
    assert not torch.equal(ids[0], windows(str(peers_llm.CALIB))[0])


def _result(lowbit: list[float], peer: list[float]) -> dict:
    rows = [{"config": "w4a16", "tool": tool, "method": method, "offset": o, "ppl": p, "kl": 1e-3}
            for tool, method, ppls in (("lowbit", "w4a16-gptq", lowbit), ("brevitas", "GPTQ", peer))
            for o, p in enumerate(ppls)]
    return {"description": "test", "fp32": {"lowbit": 5.0}, "rows": rows}


def _verdict(lowbit, peer) -> str:
    lines = peers_llm_draws.section("m", _result(lowbit, peer), ["w4a16"], list(range(len(lowbit))))
    return lines[-2]


def test_draws_verdict_follows_the_paired_difference():
    peer = [5.010, 5.002, 5.006, 4.998]
    assert "**lowbit better**" in _verdict([p - 0.002 for p in peer], peer)
    assert "**lowbit worse**" in _verdict([p + 0.002 for p in peer], peer)
    tie = _verdict([p + d for p, d in zip(peer, (0.003, -0.003, 0.002, -0.002))], peer)
    assert "no difference beyond 2 standard errors" in tie and "lower in 2 of 4 draws" in tie
    # the draws differ by more than lowbit and the peer do: the mean and sd say so per method
    table = peers_llm_draws.section("m", _result(peer, peer), ["w4a16"], [0, 1, 2, 3])
    row = next(line for line in table if line.startswith("| w4a16 | brevitas"))
    assert "| 5.0040 | 0.0052 |" in row
