"""Issue 18, finding 5: config files are read with bounded work and bounded output.

Non-UTF-8 text, YAML alias bombs, self-referencing aliases, deep nesting and giant integers
each give one short line naming the file (exit 2 from the CLI), never a traceback or an echo
of the expansion; every YAML reader of the package goes through cta_model.config.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from click.testing import CliRunner

from cta_cli.main import main
from cta_model.config import MAX_EXPANDED_NODES, parse_yaml, read_yaml
from cta_model.errors import ConfigError

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]
MAX_ERROR_BYTES = 1024


def billion_laughs(levels: int = 9) -> str:
    """The classic: 9 ** (levels + 1) strings from a file of under 1 KB."""
    lines = ['a0: &a0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for level in range(1, levels + 1):
        lines.append(f"a{level}: &a{level} [{','.join([f'*a{level - 1}'] * 9)}]")
    return "\n".join(lines) + "\n"


def refusal(path: Path) -> str:
    with pytest.raises(ConfigError) as info:
        read_yaml(path)
    message = str(info.value)
    assert str(path) in message
    assert "\n" not in message and len(message.encode()) < MAX_ERROR_BYTES
    return message


def test_non_utf8_file_names_the_file_and_the_byte_offset(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("output: /tmp/x\nnote: caf\u00e9\n".encode("latin-1"))
    message = refusal(path)
    assert message == f"{path}: not UTF-8 text: byte 0xe9 at offset 24"


def test_alias_bomb_is_refused_without_echoing_the_expansion(tmp_path):
    path = tmp_path / "bomb.yaml"
    path.write_text(billion_laughs(9))
    message = refusal(path)
    assert f"more than {MAX_EXPANDED_NODES:,} values" in message
    assert "lol" not in message


def test_aliases_within_the_bound_still_load(tmp_path):
    path = tmp_path / "anchors.yaml"
    path.write_text("base: &base {lr: 0.1, tags: [a, b]}\nrun: *base\n" + billion_laughs(3))
    data = read_yaml(path)
    assert data["run"] == {"lr": 0.1, "tags": ["a", "b"]}


def test_a_self_referencing_alias_is_refused(tmp_path):
    path = tmp_path / "loop.yaml"
    path.write_text("a: &a [1, *a]\n")
    assert "refers to a value that contains it" in refusal(path)


@pytest.mark.parametrize("opening", ["[", "{a: "])
def test_deep_nesting_is_refused(tmp_path, opening):
    path = tmp_path / "deep.yaml"
    closing = "]" if opening == "[" else "}"
    path.write_text(opening * 5000 + "1" + closing * 5000 + "\n")
    assert "nested deeper than" in refusal(path)


def test_a_giant_integer_is_a_config_error_not_a_traceback(tmp_path):
    path = tmp_path / "big.yaml"
    path.write_text("seed: " + "9" * 5000 + "\n")
    assert "not a valid value" in refusal(path)


def test_a_duplicate_key_error_is_short(tmp_path):
    path = tmp_path / "dup.yaml"
    key = "k" * 1000  # PyYAML allows simple keys up to 1024 characters
    path.write_text(f"{key}: 1\n{key}: 2\n")
    assert "given twice" in refusal(path)


def test_parse_yaml_names_its_source():
    with pytest.raises(ConfigError, match=r"^--set x: not valid YAML: .*\(line 1, column 6\)$"):
        parse_yaml("[1, 2", "--set x")


def test_alias_bomb_peak_memory_stays_small(tmp_path):
    """In a fresh process: reading the 9-level bomb costs no more than importing the loader."""
    path = tmp_path / "bomb.yaml"
    path.write_text(billion_laughs(9))
    script = textwrap.dedent(
        f"""
        import resource
        from cta_model.config import read_yaml
        from cta_model.errors import ConfigError
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        try:
            read_yaml({str(path)!r})
        except ConfigError:
            pass
        else:
            raise SystemExit("accepted")
        print(before, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=True
    )
    before_kb, after_kb = map(int, done.stdout.split())
    assert after_kb - before_kb < 20 * 1024, (before_kb, after_kb)  # < 20 MB over the import


@pytest.mark.parametrize("content", ["bomb", "latin1"])
def test_cta_train_exits_2_with_one_short_line(tmp_path, content):
    path = tmp_path / "train.yaml"
    if content == "bomb":
        path.write_text(billion_laughs(9))
    else:
        path.write_bytes(b"output: /tmp/\xff\n")
    result = CliRunner().invoke(main, ["train", "--config", str(path), "--no-env"])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {path}: ")
    assert len(result.output.encode()) < MAX_ERROR_BYTES


# ------------------------------------------------------------ one YAML reader for the package
YAML_READERS = {"safe_load", "load", "safe_load_all", "load_all", "full_load", "unsafe_load"}
# The Kubeflow Trainer CRD is vendored, multi-document and large: read with the C SafeLoader.
ALLOWED = {"cta_model/config.py", "components/train/trainjob.py"}


def test_every_yaml_reader_goes_through_the_bounded_loader():
    offenders = []
    for folder in ("cta_model", "components", "cta_cli"):
        for path in sorted((REPO / folder).rglob("*.py")):
            relative = str(path.relative_to(REPO))
            if relative in ALLOWED:
                continue
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if (
                    isinstance(node, ast.Attribute)
                    and isinstance(node.value, ast.Name)
                    and node.value.id == "yaml"
                    and node.attr in YAML_READERS
                ):
                    offenders.append(f"{relative}:{node.lineno}: yaml.{node.attr}")
    assert offenders == []
