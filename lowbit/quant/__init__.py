"""Quantization support shared by the passes: specs, observers, streaming calibration."""

from lowbit.quant.spec import QSpec, parse_qspec

__all__ = ["QSpec", "parse_qspec"]
