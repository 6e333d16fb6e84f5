"""JSON artefacts passed between steps: written atomically, checked against their schema.

Every artefact has a JSON Schema (draft 2020-12) at ``schemas/<schema_name>.schema.json``
(DESIGN 6.1), checked on write and on read. Errors name the file and the failing field path
(``dataset_ref.json: quarantine[2]: 7 is not of type 'string'``).
"""

from __future__ import annotations

import json
import os
from functools import cache
from pathlib import Path
from typing import Any

from jsonschema import Draft202012Validator
from jsonschema.exceptions import ValidationError

from cta_model.atomic import write_bytes_atomic
from cta_model.errors import ConfigError, DataError

SCHEMAS_DIR = Path(__file__).resolve().parents[1] / "schemas"


def schema_path(schema_name: str) -> Path:
    return SCHEMAS_DIR / f"{schema_name}.schema.json"


@cache
def _validator(schema_name: str) -> Draft202012Validator:
    path = schema_path(schema_name)
    try:
        schema = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such schema ({schema_name!r})") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{path}: unreadable schema: {exc}") from None
    Draft202012Validator.check_schema(schema)
    return Draft202012Validator(schema)


def field_path(error: ValidationError) -> str:
    """``quarantine[2]``, ``model.sha256``; ``(root)`` for the document itself."""
    return _join_path(list(error.absolute_path))


def _join_path(parts: list[str | int]) -> str:
    text = ""
    for part in parts:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text or "(root)"


def _problems(error: ValidationError) -> list[str]:
    """Messages that name the field itself, also for unknown and missing keys (whose
    jsonschema error sits on the enclosing object)."""
    parts = list(error.absolute_path)
    if error.validator == "additionalProperties" and isinstance(error.instance, dict):
        known = set(error.schema.get("properties", {}))
        unknown = sorted(key for key in error.instance if key not in known)
        if unknown:
            return [
                f"{_join_path([*parts, key])}: unknown field (not in the schema)" for key in unknown
            ]
    if error.validator == "required" and isinstance(error.instance, dict):
        missing = [key for key in error.validator_value if key not in error.instance]
        return [f"{_join_path([*parts, key])}: required field missing" for key in missing]
    return [f"{field_path(error)}: {error.message}"]


def validation_problems(data: Any, schema_name: str) -> list[str]:
    """``field: message`` for every schema violation of ``data`` (empty when valid)."""
    errors = sorted(_validator(schema_name).iter_errors(data), key=lambda e: list(e.path))
    problems: dict[str, None] = {}
    for error in errors:
        problems.update(dict.fromkeys(_problems(error)))
    return list(problems)


def check_schema(data: Any, schema_name: str, where: str | os.PathLike[str]) -> None:
    """DataError naming ``where`` and every failing field when ``data`` breaks the schema."""
    problems = validation_problems(data, schema_name)
    if problems:
        listed = "\n".join(f"{where}: {problem}" for problem in problems)
        raise DataError(f"{where}: does not match schema {schema_name!r}:\n{listed}")


def write_json_atomic(
    path: str | os.PathLike[str], data: Any, schema_name: str | None = None
) -> Path:
    """Write ``data`` as JSON via a temporary sibling and os.replace (after the schema check).

    A reader sees the old file or the new one, never half; nothing is written when the data
    breaks the schema. NaN and infinity are refused (they are not JSON).
    """
    target = Path(path)
    if schema_name is not None:
        check_schema(data, schema_name, target)
    try:
        text = json.dumps(data, indent=2, allow_nan=False) + "\n"
    except (TypeError, ValueError) as exc:
        raise DataError(f"{target}: cannot be written as JSON: {exc}") from None
    write_bytes_atomic(target, text.encode("utf-8"))
    return target


def read_json(path: str | os.PathLike[str], schema_name: str | None = None) -> Any:
    """The parsed JSON of ``path``, checked against its schema when ``schema_name`` is given."""
    source = Path(path)
    try:
        data = json.loads(source.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"{source}: file missing") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{source}: cannot read: {exc}") from None
    except json.JSONDecodeError as exc:
        raise DataError(f"{source}: not valid JSON: line {exc.lineno}: {exc.msg}") from None
    if schema_name is not None:
        check_schema(data, schema_name, source)
    return data
