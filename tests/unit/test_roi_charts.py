"""The ROI report's charts read well: no two drawn texts overlap, none leaves the figure, no
legend covers data, and money / percent axes say k, M and % instead of an offset ("1e6").

Each chart is rendered with the Agg backend; the texts actually drawn are collected during
``canvas.draw()`` and their window extents compared, on inputs from EUR 300 to EUR 30 M with
long input and task names.
"""

from __future__ import annotations

import itertools
from unittest import mock

import numpy as np
import pytest
from matplotlib.figure import Figure
from matplotlib.text import Text

from components.reporting.figures import money_formatter, new_figure, percent_formatter
from components.roi_report import roi as model
from components.roi_report.report import (
    cash_flow_figure,
    model_heading,
    quality_figure,
    roi_distribution_figure,
    tornado_figure,
    tornado_label,
    wrap_identifier,
)

LONG_INPUT = "expected_cost_of_a_defective_part_escaping_to_the_customer_incl_recall_campaign"
TORNADO_INPUTS = [
    LONG_INPUT,
    "images_per_s_per_device",
    "manual_cost_per_part",
    "defect_prevalence",
    "C_escape",
    "device_annual_cost",
    "discount_rate",
    "horizon_years",
    "ops_annual",
    "integration",
    "labelling",
    "flag_action_with_an_unknown_unit",
]
# (investment, annual saving, horizon): EUR 300 to EUR 30 M, paying back or never.
CASES = {
    "eur-300": (300.0, 140.0, 3),
    "eur-5k-loss": (5_000.0, -800.0, 3),
    "eur-80k": (80_000.0, 1_061_280.0, 3),
    "eur-30m-10y": (30_000_000.0, 9_000_000.0, 10),
    "eur-30m-loss": (30_000_000.0, -2_500_000.0, 5),
}


def _entry(investment: float, saving: float, horizon: int, rng: np.random.Generator) -> tuple:
    roi_pct = model.roi_pct_undiscounted(investment, saving, horizon)
    samples = rng.normal(roi_pct, 0.4 * abs(roi_pct) + 50.0, 400)
    return model.summarise(investment, saving, 0.08, horizon, samples), samples


def roi_of(case: str) -> tuple[dict, dict]:
    """A roi.json-shaped dict (the keys the charts read) and its ROI % samples."""
    investment, saving, horizon = CASES[case]
    rng = np.random.default_rng(7)
    pilot, pilot_samples = _entry(investment, saving, horizon, rng)
    fleet, fleet_samples = _entry(3 * investment, 4 * saving, horizon, rng)
    base = pilot["npv"]
    swing = max(abs(base), investment)
    tornado = [
        {
            "input": name,
            "low": low,
            "high": high,
            "npv_low": base - swing * (1.5 - 0.1 * i),
            "npv_high": base + swing * (2.0 - 0.15 * i),
        }
        for i, (name, (low, high)) in enumerate(
            zip(
                TORNADO_INPUTS,
                [
                    (15.0, 120.0),
                    (10.0, 40.0),
                    (0.04, 0.1),
                    (0.005, 0.045),
                    (15.0, 1_200_000.0),
                    (2_000.0, 5_000.0),
                    (0.05, 0.12),
                    (2, 10),
                    (8_000.0, 30_000.0),
                    (20_000.0, 2_500_000.0),
                    (300.0, 40_000.0),
                    (1.0, 3.0),
                ],
                strict=True,
            )
        )
    ]
    roi = {
        "currency": "EUR",
        "horizon_years": horizon,
        "discount_rate": 0.08,
        "pilot_line": "press-a-with-a-long-line-name",
        "pilot": pilot,
        "fleet": fleet,
        "tornado_scope": "NPV of the pilot line press-a-with-a-long-line-name",
        "tornado": tornado,
    }
    return roi, {"pilot": pilot_samples, "fleet": fleet_samples}


CHAMPION = {
    "name": "cta-inspection",
    "version": "3",
    "metrics": {
        task: {"metric": metric, "p05": -0.01 * scale, "p50": 0.02 * scale, "p95": 0.05 * scale}
        for task, metric, scale in (
            ("semseg", "miou", 1.0),
            ("height", "abs_err_mm", 10.0),
            ("surface_normals_of_the_part", "mean_angular_error_deg", 100.0),
        )
    },
}
DELTA_M = {
    "per_task_pct": {"semseg": 4.0, "height": -1.2, "surface_normals_of_the_part": 6.5},
}


def charts_of(case: str) -> dict[str, Figure]:
    roi, samples = roi_of(case)
    return {
        "cash flow": cash_flow_figure(roi),
        "ROI distribution": roi_distribution_figure(roi, samples),
        "tornado": tornado_figure(roi),
        "quality": quality_figure(CHAMPION, DELTA_M),
    }


def drawn_texts(figure: Figure) -> list[Text]:
    """The non-empty Text artists ``canvas.draw()`` renders (tick labels outside the view and
    unused ticks are not drawn, so they do not count)."""
    figure.canvas.draw()  # the constrained layout settles first
    drawn: dict[int, Text] = {}
    original = Text.draw

    def recording_draw(text: Text, renderer) -> None:
        original(text, renderer)
        if text.get_visible() and text.get_text().strip():
            drawn[id(text)] = text

    with mock.patch.object(Text, "draw", recording_draw):
        figure.canvas.draw()
    return list(drawn.values())


def layout_problems(figure: Figure) -> list[str]:
    """Overlapping texts, texts outside the figure, legends over an axes' data area."""
    renderer = figure.canvas.get_renderer()
    texts = drawn_texts(figure)
    boxes = [(repr(t.get_text()), t.get_window_extent(renderer)) for t in texts]
    problems = []
    bounds = figure.bbox
    for name, box in boxes:
        if (
            box.x0 < bounds.x0 - 0.5
            or box.y0 < bounds.y0 - 0.5
            or box.x1 > bounds.x1 + 0.5
            or box.y1 > bounds.y1 + 0.5
        ):
            problems.append(f"{name} outside the figure: {box} not in {bounds}")
    for (name_a, a), (name_b, b) in itertools.combinations(boxes, 2):
        if _overlap(a, b):
            problems.append(f"{name_a} overlaps {name_b}")
    legends = [*figure.legends, *(axes.get_legend() for axes in figure.axes)]
    for legend in filter(None, legends):
        frame = legend.get_window_extent(renderer)
        members = {id(text) for text in legend.get_texts()}
        for axes in figure.axes:
            if _overlap(frame, axes.get_window_extent(renderer)):
                problems.append(f"a legend covers the data of {axes.get_title()!r}")
        for text, (name, box) in zip(texts, boxes, strict=True):
            if id(text) not in members and _overlap(frame, box):
                problems.append(f"a legend overlaps {name}")
    return problems


def _overlap(a, b) -> bool:
    """Whether two boxes share an area (boxes that only touch do not overlap)."""
    return min(a.x1, b.x1) > max(a.x0, b.x0) and min(a.y1, b.y1) > max(a.y0, b.y0)


@pytest.mark.parametrize("case", CASES)
def test_no_chart_text_overlaps_or_leaves_the_figure(case):
    for title, figure in charts_of(case).items():
        assert figure is not None, title
        assert layout_problems(figure) == [], title


@pytest.mark.parametrize("case", CASES)
def test_axes_carry_no_offset_or_scientific_notation(case):
    for title, figure in charts_of(case).items():
        labels = [text.get_text() for text in drawn_texts(figure)]
        for axes in figure.axes:
            for axis in (axes.xaxis, axes.yaxis):
                assert axis.get_offset_text().get_text() == "", title
        assert not [label for label in labels if "e+" in label or "e-0" in label], title


def test_money_axes_say_k_or_m_from_the_range():
    expected = {"eur-300": "", "eur-5k-loss": " k", "eur-80k": " M", "eur-30m-10y": " M"}
    for case, unit in expected.items():
        figure = charts_of(case)["tornado"]
        figure.canvas.draw()
        ticks = [text.get_text() for text in figure.axes[0].get_xticklabels()]
        nonzero = [tick for tick in ticks if tick not in ("", "0")]
        assert nonzero, case
        if unit:
            assert all(tick.endswith(unit) for tick in nonzero), (case, ticks)
        else:
            assert not any(tick.endswith((" k", " M")) for tick in nonzero), (case, ticks)


@pytest.mark.parametrize(
    ("ticks", "labels"),
    [
        ([0, 100, 200, 300], ["0", "100", "200", "300"]),
        ([-10_000, 0, 10_000, 30_000], ["\N{MINUS SIGN}10 k", "0", "10 k", "30 k"]),
        ([0, 500_000, 1_000_000, 2_500_000], ["0", "0.5 M", "1.0 M", "2.5 M"]),
        ([0, 250_000, 500_000], ["0", "250 k", "500 k"]),
        ([1_000_000, 1_250_000, 1_500_000], ["1.00 M", "1.25 M", "1.50 M"]),
        ([0, 10_000_000, 30_000_000], ["0", "10 M", "30 M"]),
        ([0.0, 0.5, 1.0], ["0", "0.5", "1.0"]),
    ],
)
def test_money_formatter_picks_the_unit_from_the_axis_range(ticks, labels):
    figure = new_figure()
    axes = figure.subplots()
    axes.yaxis.set_major_formatter(money_formatter())
    axes.set_yticks(ticks)
    axes.set_ylim(min(ticks), max(ticks))
    figure.canvas.draw()
    assert [text.get_text() for text in axes.get_yticklabels()] == labels


def test_percent_formatter_writes_thousands_and_a_percent_sign():
    figure = new_figure()
    axes = figure.subplots()
    axes.xaxis.set_major_formatter(percent_formatter())
    axes.set_xlim(-1_000, 6_000)
    figure.canvas.draw()
    shown = [text.get_text() for text in axes.get_xticklabels()]
    assert "6,000 %" in shown and "0 %" in shown and "\N{MINUS SIGN}1,000 %" in shown


def test_layout_check_sees_an_overlap():
    figure = new_figure()
    axes = figure.subplots()
    axes.text(0.5, 0.5, "first label")
    axes.text(0.5, 0.5, "second label")
    axes.plot([0, 1], [0, 1], label="data")
    axes.legend(loc="center")
    problems = layout_problems(figure)
    assert "'first label' overlaps 'second label'" in problems
    assert any("legend covers" in problem for problem in problems)


def test_tornado_labels_wrap_names_and_state_units():
    assert tornado_label({"input": "C_escape", "low": 15.0, "high": 120.0}, "EUR") == (
        "C_escape\n15 - 120 EUR/part"
    )
    assert tornado_label({"input": "discount_rate", "low": 0.05, "high": 0.12}, "EUR") == (
        "discount_rate\n5 - 12 %/year"
    )
    assert tornado_label({"input": "integration", "low": 2e4, "high": 2.5e6}, "CHF") == (
        "integration\n20 k - 2.5 M CHF"
    )
    lines = wrap_identifier(LONG_INPUT, 24)
    assert "".join(lines) == LONG_INPUT and max(map(len, lines)) <= 24
    long_label = tornado_label({"input": LONG_INPUT, "low": 1.0, "high": 2.0}, "EUR")
    assert long_label.split("\n") == [
        "expected_cost_of_a_",
        "defective_part_escaping\N{HORIZONTAL ELLIPSIS}",
        "1 - 2",
    ]
    assert wrap_identifier("x" * 30, 24) == ["x" * 24, "x" * 6]


@pytest.mark.parametrize(
    ("model", "title", "subtitle"),
    [
        (
            {"name": "cta-inspection", "version": "3", "model_id": "m-1", "sha256": "a" * 64},
            "cta-inspection v3",
            "registered version 3, model id m-1",
        ),
        (
            {"name": "cta-inspection", "version": None, "model_id": "m-1", "sha256": "a" * 64},
            "cta-inspection",
            "unregistered (model id m-1)",
        ),
        (
            {"name": None, "version": None, "model_id": None, "sha256": "c" * 64},
            "unnamed model",
            "unregistered (sha256 cccccccccccc)",
        ),
    ],
)
def test_model_heading_names_name_and_version_not_the_id(model, title, subtitle):
    assert model_heading(model) == (title, subtitle)
