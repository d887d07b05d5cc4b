"""Op dialects. Importing this package registers every op."""

from lowbit.ir.dialects import attn, core, quant, rotate  # noqa: F401
