"""Quantization specs, written ``dtype/granularity[/sym|asym][/static|dynamic][/observer]``.

    int8/channel            int8, one scale per output channel, symmetric (weights)
    uint8/tensor/asym       uint8 with a zero point, one scale for the tensor (static acts;
                            unsigned codes always carry a zero point: ``uint8/tensor`` is the same)
    int8/token/dynamic      int8, one scale per token computed at run time
    int4/group128/asym      int4 with zero points, one scale per 128 inputs (weights)
    uint8/tensor/asym/mse   range chosen by MSE search over a calibration histogram
    int4/token/dynamic/mse  per token at run time, each token's range clipped by a ratio
                            chosen per quantizer by MSE on calibration tokens

Errors name the field and list the allowed values.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from lowbit.ir.types import DType

DTYPES = {"int8": DType.i8, "uint8": DType.u8, "int4": DType.i4, "uint4": DType.u4,
          "fp8": DType.f8e4m3, "fp8e4m3": DType.f8e4m3, "fp8e5m2": DType.f8e5m2}
GRANULARITIES = ("tensor", "channel", "token", "group<N>")
OBSERVERS = ("minmax", "percentile", "mse", "kl")


class QSpecError(ValueError):
    pass


@dataclass(frozen=True)
class QSpec:
    dtype: DType
    granularity: str = "tensor"  # tensor | channel | token | group
    group_size: int | None = None
    symmetric: bool = True
    dynamic: bool = False
    observer: str = "minmax"

    def __str__(self) -> str:
        name = next(k for k, v in DTYPES.items() if v == self.dtype)
        gran = f"group{self.group_size}" if self.granularity == "group" else self.granularity
        parts = [name, gran, "sym" if self.symmetric else "asym"]
        if self.dynamic:
            parts.append("dynamic")
        if self.observer != "minmax":
            parts.append(self.observer)
        return "/".join(parts)

    @property
    def qrange(self) -> tuple[float, float]:
        """The representable range: integer bounds, or ±max for fp8."""
        if self.dtype.is_float:
            import torch

            m = float(torch.finfo(self.dtype.storage).max)
            return -m, m
        return self.dtype.int_range


def parse_qspec(text: str, where: str = "spec") -> QSpec:
    """Parse a spec string; ``where`` names the recipe key or option for error messages."""
    parts = [p.strip().lower() for p in text.split("/") if p.strip()]
    if not parts:
        raise QSpecError(f"{where}: empty quantization spec")
    if parts[0] not in DTYPES:
        raise QSpecError(f"{where}: unknown dtype {parts[0]!r}; allowed: {', '.join(DTYPES)}")
    fields: dict = {"dtype": DTYPES[parts[0]]}
    for part in parts[1:]:
        group = re.fullmatch(r"group(\d+)", part)
        if part in ("tensor", "channel", "token"):
            fields["granularity"] = part
        elif group:
            fields["granularity"], fields["group_size"] = "group", int(group.group(1))
        elif part in ("sym", "asym"):
            fields["symmetric"] = part == "sym"
        elif part in ("static", "dynamic"):
            fields["dynamic"] = part == "dynamic"
        elif part in OBSERVERS:
            fields["observer"] = part
        else:
            raise QSpecError(
                f"{where}: unknown field {part!r} in {text!r}; allowed granularities: "
                f"{', '.join(GRANULARITIES)}; symmetry: sym, asym; mode: static, dynamic; "
                f"observers: {', '.join(OBSERVERS)}")
    unsigned = fields["dtype"].short.startswith("u")
    if unsigned and fields.get("symmetric"):
        raise QSpecError(f"{where}: {text!r}: {parts[0]} has no negative codes, so a symmetric range (zero "
                         f"point 0) would clip every negative value; write {parts[0]}/.../asym, or "
                         f"{parts[0][1:]}/.../sym")
    if unsigned:
        fields["symmetric"] = False  # an unsigned code needs its zero point
    if fields.get("dynamic") and fields.get("granularity", "tensor") != "token":
        raise QSpecError(f"{where}: {text!r}: scales computed at run time are per token; write "
                         f"{parts[0]}/token/... (or drop 'dynamic' for a calibrated static range)")
    if (fields.get("dynamic") or fields.get("granularity") == "token") and \
            fields.get("observer", "minmax") not in ("minmax", "mse"):
        raise QSpecError(f"{where}: {text!r}: a per-token range is each token's own min/max at run time, "
                         f"or with mse that range clipped by a calibrated ratio; {fields['observer']} "
                         "chooses a static range")
    spec = QSpec(**fields)
    if spec.dtype.is_float and not spec.symmetric:
        raise QSpecError(f"{where}: fp8 is symmetric only")
    if spec.granularity == "token" and not spec.dynamic:
        spec = QSpec(**{**fields, "dynamic": True})  # per-token scales exist only at run time
    return spec
