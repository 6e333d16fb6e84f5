"""Strict YAML config files: one pydantic model per file, unknown keys rejected, every error
naming the file and the key path (e.g. `configs/demo.yaml: optim.lr: ...`).

Reading is bounded: at most MAX_CONFIG_BYTES of UTF-8 text (a bad byte is named by its offset),
at most MAX_EXPANDED_NODES nodes once YAML aliases are expanded and MAX_DEPTH levels of nesting
(an "alias bomb" is refused while composing, before anything is built), and an error lists at
most MAX_PROBLEMS problems of at most MAX_PROBLEM_CHARS characters each. Every float of a
config model is finite and every integer fits in 64 bits (StrictModel).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

from cta_model.errors import ConfigError

ModelT = TypeVar("ModelT", bound=BaseModel)

MAX_CONFIG_BYTES = 16 * 1024 * 1024
MAX_EXPANDED_NODES = 100_000
MAX_DEPTH = 100
MAX_PROBLEMS = 20
MAX_PROBLEM_CHARS = 300
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


def _number_problem(value: Any, where: str = "") -> str | None:
    """Why `value` (or a number nested in it, at the index path `where`) is not a finite float
    or a 64-bit integer; None when it is fine."""
    at = f" (at {where})" if where else ""
    if isinstance(value, BaseModel | bool):
        return None  # a model validated itself
    if isinstance(value, float) and not math.isfinite(value):
        return f"must be finite, got {value}{at}"
    if isinstance(value, int) and not INT64_MIN <= value <= INT64_MAX:
        return f"must be an integer within 64 bits, got one of {value.bit_length()} bits{at}"
    if isinstance(value, Mapping):
        items: Any = value.items()
    elif isinstance(value, list | tuple):
        items = enumerate(value)
    else:
        return None
    for key, item in items:
        problem = _number_problem(item, f"{where}[{key!r}]")
        if problem:
            return problem
    return None


class StrictModel(BaseModel):
    """A config section: unknown keys refused, frozen, floats finite, integers within 64 bits
    (also inside untyped values such as `format_options`)."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    @field_validator("*", mode="after")
    @classmethod
    def _finite_numbers(cls, value: Any) -> Any:
        problem = _number_problem(value)
        if problem:
            raise ValueError(problem)
        return value


class ConfigLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys instead of silently keeping the last one and
    refuses documents that expand (through aliases) to more than MAX_EXPANDED_NODES nodes."""

    def compose_document(self) -> yaml.Node:
        node = super().compose_document()
        _check_expansion(node, self.name)
        return node


def _check_expansion(root: yaml.Node, source: str) -> None:
    """Count the nodes of `root` with every alias expanded, visiting each distinct node once
    (so the count itself is cheap); refuse cycles, deep nesting and large expansions."""
    sizes: dict[int, int] = {}
    on_path: set[int] = set()
    stack: list[tuple[yaml.Node, int, bool]] = [(root, 1, False)]
    while stack:
        node, depth, children_done = stack.pop()
        key = id(node)
        if children_done:
            on_path.discard(key)
            total = 1 + sum(sizes[id(child)] for child in _children(node))
            if total > MAX_EXPANDED_NODES:
                raise ConfigError(
                    f"{source}: refused: its aliases expand to more than {MAX_EXPANDED_NODES:,} "
                    f"values (at line {node.start_mark.line + 1}); write the values out"
                )
            sizes[key] = total
            continue
        if key in sizes:
            continue
        if key in on_path:
            raise ConfigError(
                f"{source}: refused: an alias refers to a value that contains it "
                f"(line {node.start_mark.line + 1})"
            )
        if depth > MAX_DEPTH:
            raise ConfigError(f"{source}: refused: nested deeper than {MAX_DEPTH} levels")
        on_path.add(key)
        stack.append((node, depth, True))
        stack.extend((child, depth + 1, False) for child in _children(node))


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.MappingNode):
        return [part for pair in node.value for part in pair]
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    return []


def _construct_unique_mapping(loader: yaml.SafeLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    mapping: dict[Any, Any] = {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        if key in mapping:
            raise yaml.constructor.ConstructorError(
                None, None, f"key {_short(repr(key), 80)} given twice", key_node.start_mark
            )
        mapping[key] = loader.construct_object(value_node, deep=True)
    return mapping


ConfigLoader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_unique_mapping
)


def _short(text: str, limit: int = MAX_PROBLEM_CHARS) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def key_path(loc: Sequence[int | str]) -> str:
    text = ""
    for part in loc:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            text += f".{part}" if text else str(part)
    return text


def format_validation_error(source: str, exc: ValidationError) -> str:
    """One line per problem (at most MAX_PROBLEMS, each cut to MAX_PROBLEM_CHARS), each naming
    `source` and the key path."""
    problems = []
    errors = exc.errors()
    for error in errors[:MAX_PROBLEMS]:
        path = key_path(error["loc"])
        message = error["msg"].removeprefix("Value error, ")
        if error["type"] == "extra_forbidden":
            message = "unknown key (check the spelling; allowed keys are documented in the file)"
        elif error["type"] == "finite_number":
            message = f"must be finite, got {error['input']}"
        problems.append(_short(f"{source}: {path}: {message}" if path else f"{source}: {message}"))
    if len(errors) > MAX_PROBLEMS:
        problems.append(f"{source}: ... and {len(errors) - MAX_PROBLEMS} more problems")
    return "\n".join(problems)


def read_yaml(path: str | Path) -> Any:
    path = Path(path)
    try:
        with path.open("rb") as stream:
            data = stream.read(MAX_CONFIG_BYTES + 1)
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc}") from None
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{path}: larger than {MAX_CONFIG_BYTES // 2**20} MiB; not a config")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"{path}: not UTF-8 text: byte 0x{data[exc.start]:02x} at offset {exc.start}"
        ) from None
    return parse_yaml(text, str(path))


def parse_yaml(text: str, source: str) -> Any:
    """YAML text (e.g. read through a dataset opener) with the bounds of ConfigLoader; errors
    name ``source`` and never echo the document."""
    loader = ConfigLoader(text)
    loader.name = source  # marks in parser errors name the file, not "<unicode string>"
    try:
        return loader.get_single_data()
    except yaml.YAMLError as exc:
        raise ConfigError(_short(f"{source}: not valid YAML: {_yaml_problem(exc)}")) from None
    except RecursionError:
        raise ConfigError(f"{source}: refused: nested deeper than {MAX_DEPTH} levels") from None
    except ValueError as exc:  # e.g. an integer of more than 4300 digits
        if isinstance(exc, ConfigError):
            raise
        raise ConfigError(_short(f"{source}: not a valid value: {exc}")) from None
    finally:
        loader.dispose()


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """PyYAML's problem and where, on one line (its own text adds a snippet of the file)."""
    if not isinstance(exc, yaml.MarkedYAMLError):
        return str(exc).replace("\n", " ")
    problem = ", ".join(part for part in (exc.context, exc.problem) if part) or "syntax error"
    mark = exc.problem_mark or exc.context_mark
    where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
    return f"{problem}{where}"


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
