"""The README's Python examples run as written, in order, in one namespace (a block that needs
a CUDA GPU is skipped without one)."""

import re
from pathlib import Path

import pytest
import torch

README = Path(__file__).parent.parent / "README.md"


def _blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_examples():
    assert len(_blocks()) >= 3


def test_readme_examples_run():
    namespace: dict = {}
    ran = 0
    for i, code in enumerate(_blocks()):
        if "cuda" in code and not torch.cuda.is_available():
            continue
        try:
            exec(compile(code, f"README.md python block {i}", "exec"), namespace)
        except Exception as e:
            pytest.fail(f"README python block {i} failed: {type(e).__name__}: {e}\n{code}")
        ran += 1
    assert ran >= 3
