"""Issue 18, finding 3: every float of every config is finite and sizes, epochs, batch sizes
and seeds have stated bounds; errors name the file and the key."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from cta_model.errors import ConfigError
from cta_model.train_config import load_train_config, validate_train_config

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "configs"


def minimal(**extra: Any) -> dict[str, Any]:
    return {"data": {"path": "/data/lines"}, "epochs": 1, "output": "/tmp/out", **extra}


def error_of(data: dict[str, Any]) -> str:
    with pytest.raises(ConfigError) as info:
        validate_train_config(data, "cfg.yaml")
    return str(info.value)


# The probes of the review: each was accepted (or died later with a traceback) before.
@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (minimal(optim={"lr": math.inf}), "cfg.yaml: optim.lr: must be finite, got inf"),
        (minimal(optim={"lr": math.nan}), "cfg.yaml: optim.lr: must be finite, got nan"),
        (minimal(optim={"grad_clip": math.inf}), "cfg.yaml: optim.grad_clip: must be finite"),
        (
            minimal(loss={"weights": {"semseg": math.nan}}),
            "cfg.yaml: loss.weights.semseg: must be finite, got nan",
        ),
        (minimal(loss={"weights": {"height": -1.0}}), "cfg.yaml: loss.weights.height: "),
        (
            minimal(data={"path": "x", "augment": {"scales": [1.0, math.nan]}}),
            "cfg.yaml: data.augment.scales[1]: must be finite, got nan",
        ),
        (minimal(data={"path": "x", "augment": {"scales": [100.0]}}), "data.augment.scales"),
        (minimal(model={"input_size": [100000, 100000]}), "cfg.yaml: model.input_size: "),
        (minimal(epochs=10**30), "cfg.yaml: epochs: "),
        (minimal(epochs=1e30), "cfg.yaml: epochs: "),
        (minimal(max_steps=10**12), "cfg.yaml: max_steps: "),
        (minimal(batch_size=1e9), "cfg.yaml: batch_size: "),
        (minimal(seed=-(10**40)), "cfg.yaml: seed: "),
        (minimal(seed=-1), "cfg.yaml: seed: "),
        (minimal(seed=2**32), "cfg.yaml: seed: "),
        (minimal(data={"path": "x", "num_workers": 10_000}), "cfg.yaml: data.num_workers: "),
        (minimal(early_stopping={"min_delta": math.inf}), "early_stopping.min_delta: must be"),
        (minimal(distill={"seg_confidence": math.nan}), "distill.seg_confidence: must be"),
        (minimal(model={"gamma": math.nan}), "cfg.yaml: model.gamma: must be finite"),
        (
            {
                **minimal(),
                "data": {"path": "x", "format": "nyuv2", "format_options": {"k": math.inf}},
            },
            "cfg.yaml: data.format_options: must be finite, got inf (at ['k'])",
        ),
        (
            {
                **minimal(),
                "data": {"path": "x", "format": "nyuv2", "format_options": {"k": 10**30}},
            },
            "cfg.yaml: data.format_options: must be an integer within 64 bits",
        ),
    ],
)
def test_non_finite_and_out_of_range_values_are_refused_naming_the_key(data, expected):
    message = error_of(data)
    assert expected in message
    assert "\n" not in message


def test_stated_bounds_are_accepted_at_their_limits():
    config = validate_train_config(
        minimal(
            seed=2**32 - 1,
            epochs=100_000,
            max_steps=1_000_000_000,
            batch_size=65_536,
            model={"input_size": [8192, 8192]},
            data={"path": "x", "num_workers": 256, "augment": {"scales": [0.5, 8.0]}},
        )
    )
    assert config.seed == 2**32 - 1 and config.model.input_size == (8192, 8192)


def test_yaml_probe_from_the_review_exits_as_a_config_error(tmp_path):
    path = tmp_path / "x.yaml"
    path.write_text("data: {path: /d}\noutput: /tmp/o\nepochs: 1\noptim: {lr: .inf}\n")
    with pytest.raises(ConfigError, match=r"x\.yaml: optim\.lr: must be finite, got inf"):
        load_train_config(path)


# ------------------------------------------------------- every shipped config, every float
def _float_paths(node: Any, path: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _float_paths(value, (*path, key))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from _float_paths(value, (*path, index))
    elif isinstance(node, float):
        yield path


def _replaced(node: Any, path: tuple[Any, ...], value: float) -> Any:
    if not path:
        return value
    head, *rest = path
    copy = list(node) if isinstance(node, list) else dict(node)
    copy[head] = _replaced(node[head], tuple(rest), value)
    return copy


def _loaders() -> dict[str, Callable[[Path], Any]]:
    from components.gate.policy import load_policy
    from components.monitor.config import load_monitor_config
    from components.roi_report.config import load_roi_config
    from components.rollout.plan import load_plan
    from cta_model.data.lines import load_lines_config
    from cta_model.inspection import load_inspection_config

    lines = load_lines_config(CONFIGS / "lines.yaml")
    return {
        "demo.yaml": load_train_config,
        "synthetic-benchmark.yaml": load_train_config,
        "gate.yaml": load_policy,
        "gate-demo.yaml": load_policy,
        "monitor.yaml": load_monitor_config,
        "inspection.yaml": load_inspection_config,
        "roi.yaml": lambda path: load_roi_config(path, lines),
        "rollout-plan.yaml": lambda path: load_plan(path, lines),
    }


@pytest.mark.parametrize("name", sorted(_loaders()))
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_every_float_of_every_shipped_config_must_be_finite(name, bad, tmp_path):
    load = _loaders()[name]
    original = yaml.safe_load((CONFIGS / name).read_text())
    paths = list(_float_paths(original))
    assert paths, f"{name} has no float to probe"
    for path in paths:
        target = tmp_path / name
        target.write_text(yaml.safe_dump(_replaced(original, path, bad)))
        with pytest.raises(ConfigError) as info:
            load(target)
        message = str(info.value)
        assert str(target) in message, (path, message)
        assert "finite" in message, (path, message)
