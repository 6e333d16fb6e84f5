"""Strict YAML config files: one pydantic model per file, unknown keys rejected, every error
naming the file and the key path (e.g. `configs/demo.yaml: optim.lr: ...`)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from cta_model.errors import ConfigError

ModelT = TypeVar("ModelT", bound=BaseModel)


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys instead of silently keeping the last one."""


def _construct_unique_mapping(loader: yaml.SafeLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    mapping: dict[Any, Any] = {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        if key in mapping:
            raise yaml.constructor.ConstructorError(
                None, None, f"key {key!r} given twice", key_node.start_mark
            )
        mapping[key] = loader.construct_object(value_node, deep=True)
    return mapping


_UniqueKeyLoader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_unique_mapping
)


def key_path(loc: Sequence[int | str]) -> str:
    text = ""
    for part in loc:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            text += f".{part}" if text else str(part)
    return text


def format_validation_error(source: str, exc: ValidationError) -> str:
    problems = []
    for error in exc.errors():
        path = key_path(error["loc"])
        message = error["msg"].removeprefix("Value error, ")
        if error["type"] == "extra_forbidden":
            message = "unknown key (check the spelling; allowed keys are documented in the file)"
        problems.append(f"{source}: {path}: {message}" if path else f"{source}: {message}")
    return "\n".join(problems)


def read_yaml(path: str | Path) -> Any:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc}") from None
    return parse_yaml(text, str(path))


def parse_yaml(text: str, source: str) -> Any:
    """YAML text (e.g. read through a dataset opener); errors name ``source``."""
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: not valid YAML: {exc}") from None


def validate_config(model: type[ModelT], data: Any, source: str) -> ModelT:
    if not isinstance(data, Mapping):
        kind = type(data).__name__
        raise ConfigError(f"{source}: expected a mapping at the top level, got {kind}")
    try:
        return model.model_validate(dict(data))
    except ValidationError as exc:
        raise ConfigError(format_validation_error(source, exc)) from None


def load_config(model: type[ModelT], path: str | Path) -> ModelT:
    return validate_config(model, read_yaml(path), str(path))


def set_dotted(data: dict[str, Any], dotted_key: str, value: Any) -> dict[str, Any]:
    """Return a copy of nested `data` with `a.b.c` set to value (used for flag/env overrides)."""
    out = dict(data)
    head, _, rest = dotted_key.partition(".")
    if rest:
        child = out.get(head)
        out[head] = set_dotted(dict(child) if isinstance(child, Mapping) else {}, rest, value)
    else:
        out[head] = value
    return out
