"""Pipeline strings: ``name{key=value,...},name,...``.

    parse_pipeline("canonicalize,fold-constants{max_elements=4096}")

Names may be aliases that expand to pipelines. Errors point at the offending token:

    unknown pass 'fold-constant' (did you mean fold-constants?)
      canonicalize,fold-constant
                   ^
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import typing

from lowbit.errors import PipelineError
from lowbit.passes.base import ALIASES, PASSES, Pass

_NAME = re.compile(r"[a-z][a-z0-9-]*")
_KEY = re.compile(r"[a-z_][a-z0-9_]*")
_VALUE = re.compile(r"[^,{}=\s]+")


def _error(text: str, pos: int, msg: str) -> PipelineError:
    return PipelineError(f"{msg}\n  {text}\n  {' ' * pos}^")


def _coerce(text: str, pos: int, value: str, annotation: object, where: str) -> object:
    hint = typing.get_args(annotation) or (annotation,)
    if value == "none" and type(None) in hint:
        return None
    for t in hint:
        try:
            if t is bool:
                if value.lower() in ("true", "1", "yes"):
                    return True
                if value.lower() in ("false", "0", "no"):
                    return False
                continue
            if t in (int, float, str):
                return t(value)
        except ValueError:
            continue
    names = " or ".join(getattr(t, "__name__", str(t)) for t in hint)
    raise _error(text, pos, f"{where}: {value!r} is not a valid {names}")


def _make(cls: type[Pass], opts: list[tuple[str, str, int]], text: str) -> Pass:
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value, pos in opts:
        if key not in fields:
            known = ", ".join(fields) or "no options"
            close = difflib.get_close_matches(key, list(fields), n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise _error(text, pos, f"pass {cls.name} has no option {key!r}{hint}; it takes: {known}")
        kwargs[key] = _coerce(text, pos, value, hints[key], f"{cls.name}.{key}")
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise PipelineError(f"{cls.name}: {e}") from None


def _unknown(name: str) -> str:
    close = difflib.get_close_matches(name, sorted(PASSES) + sorted(ALIASES), n=3, cutoff=0.6)
    return f"unknown pass {name!r}" + (f" (did you mean {', '.join(close)}?)" if close else
                                       f"; known passes: {', '.join(sorted(PASSES))}")


def parse_pipeline(text: str) -> list[Pass]:
    """Parse a pipeline string into pass instances (aliases expanded)."""
    import lowbit.passes  # noqa: F401  (registers the passes)

    passes: list[Pass] = []
    i = 0
    n = len(text)
    if not text.strip():
        raise PipelineError("empty pipeline")
    while True:
        while i < n and text[i] == " ":
            i += 1
        m = _NAME.match(text, i)
        if not m:
            raise _error(text, i, "expected a pass name")
        name, start, i = m.group(0), i, m.end()
        opts: list[tuple[str, str, int]] = []
        if i < n and text[i] == "{":
            i += 1
            while True:
                km = _KEY.match(text, i)
                if not km:
                    raise _error(text, i, "expected an option name")
                if km.end() >= n or text[km.end()] != "=":
                    raise _error(text, km.end(), "expected '=' after the option name")
                vm = _VALUE.match(text, km.end() + 1)
                if not vm:
                    raise _error(text, km.end() + 1, "expected an option value")
                opts.append((km.group(0), vm.group(0), km.start()))
                i = vm.end()
                if i < n and text[i] == ",":
                    i += 1
                    continue
                if i < n and text[i] == "}":
                    i += 1
                    break
                raise _error(text, i, "expected ',' or '}' after the option value")
        if name in ALIASES:
            if opts:
                raise _error(text, start, f"{name} is a pipeline alias and takes no options")
            passes += parse_pipeline(ALIASES[name])
        elif name in PASSES:
            passes.append(_make(PASSES[name], opts, text))
        else:
            raise _error(text, start, _unknown(name))
        while i < n and text[i] == " ":
            i += 1
        if i >= n:
            return passes
        if text[i] != ",":
            raise _error(text, i, "expected ',' between passes")
        i += 1
