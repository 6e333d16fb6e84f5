"""No pickle where a model, checkpoint or config is loaded (issue 9, security).

Scans the project's own source (cta_model, components, pipelines, bench) with the ast module:
``torch.load`` always with ``weights_only=True``; ``np.load`` always with ``allow_pickle=False``;
no ``pickle.load(s)`` / ``dill`` / ``cloudpickle`` / ``joblib.load``; ``yaml.load`` only with a
SafeLoader (sub)class; MLflow models are logged from code, never with a pickled python_model.
The scan is checked against planted bad snippets so that it cannot silently pass.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
SCANNED = ("cta_model", "components", "pipelines", "bench")
UNSAFE_MODULE_CALLS = {
    ("pickle", "load"),
    ("pickle", "loads"),
    ("dill", "load"),
    ("dill", "loads"),
    ("cloudpickle", "load"),
    ("cloudpickle", "loads"),
    ("joblib", "load"),
}


def _keyword(call: ast.Call, name: str) -> ast.expr | None:
    return next((k.value for k in call.keywords if k.arg == name), None)


def _is_const(node: ast.expr | None, value: object) -> bool:
    return isinstance(node, ast.Constant) and node.value is value


def problems_in(source: str, filename: str) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
            continue
        owner = node.func.value
        owner_name = owner.id if isinstance(owner, ast.Name) else None
        attribute = node.func.attr
        where = f"{filename}:{node.lineno}"
        if owner_name == "torch" and attribute == "load":
            if not _is_const(_keyword(node, "weights_only"), True):
                found.append(f"{where}: torch.load without weights_only=True")
        elif owner_name in ("np", "numpy") and attribute == "load":
            if not _is_const(_keyword(node, "allow_pickle"), False):
                found.append(f"{where}: np.load without allow_pickle=False")
        elif (owner_name, attribute) in UNSAFE_MODULE_CALLS:
            found.append(f"{where}: {owner_name}.{attribute} unpickles arbitrary objects")
        elif owner_name == "yaml" and attribute in ("load", "load_all"):
            loader = _keyword(node, "Loader")
            text = ast.unparse(loader) if loader is not None else ""
            if not ("safe" in text.lower() or text == "ConfigLoader"):
                found.append(f"{where}: yaml.{attribute} without a SafeLoader")
        elif attribute == "log_model" and _keyword(node, "python_model") is not None:
            # Models from code: python_model is the path of a file, e.g. str(PATH); an
            # instance (SomeModel(...)) would be pickled.
            model = _keyword(node, "python_model")
            is_path = not isinstance(model, ast.Call) or ast.unparse(model.func) in (
                "str",
                "os.fspath",
            )
            if not is_path:
                found.append(f"{where}: log_model with a pickled python_model object")
    return found


def test_the_scan_catches_planted_unsafe_loads():
    planted = (
        "import torch, numpy as np, pickle, yaml\n"
        "torch.load('x.pt')\n"
        "torch.load('x.pt', weights_only=False)\n"
        "np.load('x.npy')\n"
        "pickle.loads(b'')\n"
        "yaml.load(text, Loader=yaml.FullLoader)\n"
        "mlflow.pyfunc.log_model(name='m', python_model=Wrapper())\n"
    )
    assert len(problems_in(planted, "planted.py")) == 6
    safe = (
        "torch.load('x.pt', map_location='cpu', weights_only=True)\n"
        "np.load(buffer, allow_pickle=False)\n"
        "yaml.load(text, Loader=yaml.SafeLoader)\n"
        "mlflow.pyfunc.log_model(name='m', python_model=str(MODEL_FILE))\n"
    )
    assert problems_in(safe, "safe.py") == []


def test_project_source_never_unpickles():
    problems = []
    for folder in SCANNED:
        for path in sorted((ROOT / folder).rglob("*.py")):
            problems += problems_in(path.read_text(encoding="utf-8"), str(path.relative_to(ROOT)))
    assert problems == []


def test_servers_bind_loopback_unless_told_otherwise():
    from click.testing import CliRunner

    from cta_cli.main import main

    help_text = CliRunner().invoke(main, ["serve", "--help"]).output
    assert "127.0.0.1" in help_text
