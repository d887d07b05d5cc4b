"""Recipes: named pipelines with their options, as YAML (or TOML) files.

    description: int8 weights and activations
    pipeline:
      - smooth-quant: {alpha: 0.5}
      - insert-qdq: {weights: int8/channel, acts: uint8/tensor/asym}

A recipe is a built-in name (``lowbit/recipes/<name>.yaml``), a path to a user file, or the
same mapping in Python (``{"pipeline": [{"insert-qdq": {"weights": "int4/group128"}}]}``). It
expands to a pipeline string; errors name the recipe key and the allowed values.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from pathlib import Path

import yaml

from lowbit.errors import PipelineError

RECIPE_DIR = Path(__file__).parent / "recipes"


def builtin_recipes() -> list[str]:
    return sorted(p.stem for p in RECIPE_DIR.glob("*.yaml"))


Recipe = str | os.PathLike | Mapping


def _load(recipe: Recipe) -> tuple[dict, str]:
    if isinstance(recipe, Mapping):
        return dict(recipe), "(mapping)"
    if not isinstance(recipe, (str, os.PathLike)):
        raise PipelineError(f"recipe: expected a built-in name, a .yaml/.toml file or a mapping with a 'pipeline' "
                            f"key, got {type(recipe).__name__}")
    path = Path(recipe)
    if recipe in builtin_recipes():
        path = RECIPE_DIR / f"{recipe}.yaml"
    elif not path.is_file():
        raise PipelineError(f"unknown recipe {recipe!r}; built-in recipes: {', '.join(builtin_recipes())} "
                            "(or give a .yaml/.toml file)")
    text = path.read_text()
    try:
        data = tomllib.loads(text) if path.suffix == ".toml" else yaml.safe_load(text)
    except (yaml.YAMLError, tomllib.TOMLDecodeError) as e:
        raise PipelineError(f"recipe {path}: not valid {path.suffix[1:].upper() or 'YAML'}: {e}") from None
    if not isinstance(data, dict):
        raise PipelineError(f"recipe {path}: expected a mapping with a 'pipeline' key")
    return data, str(path)


def _item(entry: object, where: str) -> str:
    if isinstance(entry, str):
        return entry
    if isinstance(entry, Mapping) and len(entry) == 1:
        (name, opts), = entry.items()
        if not isinstance(opts, Mapping | None):
            raise PipelineError(f"{where}.{name}: options must be a mapping, got {opts!r}")
        body = ",".join(f"{k}={'none' if v is None else str(v).lower() if isinstance(v, bool) else v}"
                        for k, v in (opts or {}).items())
        return f"{name}{{{body}}}" if body else str(name)
    raise PipelineError(f"{where}: each step is a pass name or {{name: {{option: value}}}}, got {entry!r}")


def recipe_pipeline(recipe: Recipe) -> str:
    """The pipeline string a recipe expands to (validated by parsing it)."""
    from lowbit.passes.pipeline import parse_pipeline

    data, where = _load(recipe)
    unknown = set(data) - {"description", "pipeline"}
    if unknown:
        raise PipelineError(f"recipe {where}: unknown key(s) {sorted(unknown)}; allowed: description, pipeline")
    steps = data.get("pipeline")
    if not isinstance(steps, list) or not steps:
        raise PipelineError(f"recipe {where}: 'pipeline' must be a non-empty list of passes")
    pipeline = ",".join(_item(s, f"recipe {where}: pipeline[{i}]") for i, s in enumerate(steps))
    try:
        parse_pipeline(pipeline)
    except PipelineError as e:
        raise PipelineError(f"recipe {where}: {e}") from None
    return pipeline


def recipe_description(recipe: Recipe) -> str:
    return str(_load(recipe)[0].get("description", ""))
