"""Errors lowbit raises. Each names what failed and where (node, module path, pass, token)."""


class LowbitError(Exception):
    """Base class of lowbit's errors."""


class TraceError(LowbitError):
    """torch.export could not trace the model."""


class VerifyError(LowbitError):
    """The graph breaks an IR rule."""


class ParseError(LowbitError):
    """IR text or a pipeline string could not be read; the message points at the token."""


class PipelineError(LowbitError):
    """A pipeline string or recipe is malformed or names an unknown pass or option."""


class PassError(LowbitError):
    """A pass failed; the message names the pass and where the failing graph was written."""


class ModelSpecError(LowbitError):
    """A MODEL argument names no known model, file, module or directory."""


class CheckpointError(LowbitError):
    """A saved model could not be written or read; the message names the folder and what is wrong."""


class InputError(LowbitError, ValueError):
    """An input (example, calibration batch or run-time call) does not fit the traced model;
    the message names the input, the dim and what is allowed."""
