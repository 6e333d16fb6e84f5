"""Quality benchmark (`make bench-quality`): STL, HPS and CTAL on the synthetic inspection scenes.

Every (arch, seed) is one training run of `cta_model.training.train` in a fresh subprocess
(through bench/common.py), with the same recipe; its row holds the best validation metrics,
parameters and forward FLOPs at the input size (cta_model/nn/summary.py). The parent reports
per-task metrics as mean and spread (min, max) over seeds, and Delta_m of HPS and CTAL against
the STL models (cta_model.delta_m.delta_m, seed means). `stl` trains one network per task behind
one interface, so one run gives every task's single-task baseline.

    python bench/quality.py --size smoke   # ~2 min proof that it works (1 seed, 32x32)
    python bench/quality.py --size cpu     # 3 seeds at 64x64, 12 epochs: ~15 min on 2 idle cores
    python bench/quality.py --size full    # 3 seeds at 128x128 on a GPU

Results: bench/results/quality-<size>.{json,md} (quality.{json,md} for `cpu`).
"""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import bench_main, markdown_table  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TASKS = ("semseg", "height", "normals")
ARCHS = ("stl", "hps", "ctal")
# The child's program: the config file as it is (no CTA_* environment overrides).
_TRAIN_FROM_FILE = (
    "import sys; from cta_model.train_config import load_train_config; "
    "from cta_model.training import train; train(load_train_config(sys.argv[1]))"
)
SIZES: dict[str, dict[str, Any]] = {
    "smoke": {
        "seeds": 1,
        "image": 32,
        "backbone": "resnet18",
        "samples_per_line": 6,
        "epochs": 1,
        "batch_size": 4,
    },
    "cpu": {
        "seeds": 3,
        "image": 64,
        "backbone": "resnet18",
        "samples_per_line": 40,
        "epochs": 12,
        "batch_size": 8,
    },
    "full": {
        "seeds": 3,
        "image": 128,
        "backbone": "hrnet-w18-small-v2",
        "samples_per_line": 200,
        "epochs": 40,
        "batch_size": 8,
    },
}


def _size_from_argv() -> str:
    """`--size NAME` is this script's own flag; bench_main parses the rest."""
    size = "cpu"
    if "--size" in sys.argv:
        at = sys.argv.index("--size")
        size = sys.argv[at + 1]
        del sys.argv[at : at + 2]
    if size not in SIZES:
        raise SystemExit(f"--size must be one of {', '.join(SIZES)}, got {size!r}")
    return size


def configs(size: str) -> list[str]:
    return [f"{size}:{arch}:{seed}" for arch in ARCHS for seed in range(SIZES[size]["seeds"])]


def _train_config(size: str, arch: str, seed: int, output: Path) -> dict[str, Any]:
    recipe = SIZES[size]
    model: dict[str, Any] = {
        "arch": arch,
        "backbone": recipe["backbone"],
        "tasks": list(TASKS),
        "input_size": [recipe["image"], recipe["image"]],
    }
    if recipe["backbone"].startswith("resnet"):
        model["output_stride"] = 8
    return {
        "model": model,
        "loss": {"weighting": "fixed", "deep_supervision": True},
        "data": {
            # The data seed is fixed: seeds vary the initialisation and order, not the scenes.
            "synthetic": {
                "lines": 3,
                "samples_per_line": recipe["samples_per_line"],
                "size": recipe["image"],
                "seed": 0,
            },
            "augment": {"hflip": True, "scales": [1.0]},
            "num_workers": 0,
        },
        "optim": {"name": "adam", "lr": 1.0e-3, "weight_decay": 1.0e-4},
        "schedule": {"name": "cosine", "warmup_steps": 0},
        "epochs": recipe["epochs"],
        "batch_size": recipe["batch_size"],
        "seed": seed,
        "precision": "auto",
        "checkpoint": {"every_steps": 0, "keep_last": 1},
        "early_stopping": {"metric": "val_loss", "patience": None},
        "output": str(output),
    }


def measure(key: str) -> dict[str, Any]:
    import torch
    import yaml

    from cta_model.model_folder import load_model_folder
    from cta_model.nn.summary import model_summary

    size, arch, seed_text = key.split(":")
    with tempfile.TemporaryDirectory(prefix="cta-bench-quality-") as tmp:
        run = Path(tmp) / "run"
        config_path = Path(tmp) / "train.yaml"
        config_path.write_text(yaml.safe_dump(_train_config(size, arch, int(seed_text), run)))
        env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "DVC_NO_ANALYTICS": "1"}
        done = subprocess.run(
            [sys.executable, "-c", _TRAIN_FROM_FILE, str(config_path)],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            check=False,
        )
        if done.returncode != 0:
            raise RuntimeError(f"training {key} failed:\n{done.stderr[-3000:]}")
        result = json.loads((run / "train_result.json").read_text())
        model, _ = load_model_folder(run / "model")
        image = SIZES[size]["image"]
        summary = model_summary(model, (image, image))
    return {
        "config": key,
        "size": size,
        "arch": arch,
        "seed": int(seed_text),
        "metrics": {k: v for k, v in result["best_metrics"].items() if "." in k},
        "best_epoch": result["best_epoch"],
        "images_per_s": result["images_per_s"],
        "params": summary["params"]["total"],
        "gflops": summary["flops"]["total"] / 1e9,
        "torch_threads": torch.get_num_threads(),
    }


def _finite(values: list[float]) -> list[float]:
    return [v for v in values if v is not None and math.isfinite(v)]


def summarise(rows: list[dict[str, Any]]) -> tuple[dict[str, Any], str]:
    from cta_model.delta_m import delta_m
    from cta_model.tasks import metric_directions, primary_metrics

    primary = primary_metrics(TASKS)
    directions = metric_directions(TASKS)
    keys = [f"{t}.{m}" for t, m in primary.items()]
    means: dict[str, dict[str, float]] = {}
    table = []
    for arch in ARCHS:
        arch_rows = [r for r in rows if r["arch"] == arch]
        if not arch_rows:
            continue
        all_keys = sorted({k for r in arch_rows for k in r["metrics"]})
        means[arch] = {}
        entry: dict[str, Any] = {"arch": arch, "seeds": len(arch_rows)}
        for metric in all_keys:
            values = _finite([r["metrics"].get(metric) for r in arch_rows])
            if values:
                means[arch][metric] = statistics.fmean(values)
            if metric in keys:
                spread = f" [{min(values):.4g}, {max(values):.4g}]" if len(values) > 1 else ""
                entry[metric] = f"{statistics.fmean(values):.4g}{spread}" if values else None
        entry["params (M)"] = arch_rows[0]["params"] / 1e6
        entry["GFLOPs"] = arch_rows[0]["gflops"]
        table.append(entry)
    ratios: dict[str, Any] = {}
    if "stl" in means:
        for arch in ("hps", "ctal"):
            if arch in means:
                result = delta_m(means[arch], means["stl"], primary, directions)
                ratios[f"{arch}.delta_m_vs_stl"] = result
        for entry in table:
            entry["Delta_m vs STL (%)"] = (
                ratios.get(f"{entry['arch']}.delta_m_vs_stl", {}).get(
                    "delta_m_primary_pct_higher_better"
                )
                if entry["arch"] != "stl"
                else None
            )
    per_seed = _per_seed_delta_m(rows, means.get("stl"), primary, directions)
    ratios.update(per_seed)
    params = {r["arch"]: r["params"] for r in rows}
    if "stl" in params and "ctal" in params:
        ratios["ctal_params_over_stl"] = params["ctal"] / params["stl"]
    if {"hps.delta_m_vs_stl", "ctal.delta_m_vs_stl"} <= set(ratios):
        key = "delta_m_primary_pct_higher_better"
        ratios["target_ctal_delta_m_above_hps"] = {
            "ctal": ratios["ctal.delta_m_vs_stl"][key],
            "hps": ratios["hps.delta_m_vs_stl"][key],
            "holds": ratios["ctal.delta_m_vs_stl"][key] > ratios["hps.delta_m_vs_stl"][key],
            "ctal_above_hps_seeds": per_seed.get("ctal_above_hps_seeds"),
            "fewer_params_than_stl": ratios.get("ctal_params_over_stl", 2.0) < 1.0,
        }
    columns = ["arch", "seeds", *keys, "Delta_m vs STL (%)", "params (M)", "GFLOPs"]
    size = rows[0]["size"] if rows else "?"
    markdown = (
        f"## Quality on synthetic scenes (size `{size}`: {SIZES[size]['image']}px, "
        f"{SIZES[size]['backbone']}, {SIZES[size]['epochs']} epochs; best validation metrics, "
        "mean [min, max] over seeds)\n\n" + markdown_table(table, columns)
    )
    if "ctal_above_hps_seeds" in per_seed:
        spread = {arch: per_seed[f"{arch}.delta_m_per_seed"] for arch in ("hps", "ctal")}
        markdown += (
            "\nDelta_m vs STL per seed (%): "
            + "; ".join(
                f"{arch.upper()} " + ", ".join(f"{v:+.2f}" for v in values)
                for arch, values in spread.items()
            )
            + f". CTAL above HPS with the same seed in {per_seed['ctal_above_hps_seeds']} of "
            f"{len(spread['ctal'])} seeds.\n"
        )
    return ratios, markdown


def _per_seed_delta_m(
    rows: list[dict[str, Any]],
    stl_means: dict[str, float] | None,
    primary: dict[str, str],
    directions: dict[str, str],
) -> dict[str, Any]:
    """Delta_m of each HPS and CTAL seed against the STL seed means, and how many seeds
    (paired by seed: same initialisation seed and data order) put CTAL above HPS; the seed
    means alone hide whether a gap is larger than the run-to-run spread."""
    from cta_model.delta_m import delta_m

    if not stl_means:
        return {}
    key = "delta_m_primary_pct_higher_better"
    by_seed: dict[str, dict[int, float]] = {}
    for row in rows:
        if row["arch"] in ("hps", "ctal"):
            result = delta_m(row["metrics"], stl_means, primary, directions)
            by_seed.setdefault(row["arch"], {})[row["seed"]] = result[key]
    out: dict[str, Any] = {
        f"{arch}.delta_m_per_seed": [values[s] for s in sorted(values)]
        for arch, values in by_seed.items()
    }
    if {"hps", "ctal"} <= set(by_seed):
        paired = sorted(set(by_seed["hps"]) & set(by_seed["ctal"]))
        out["ctal_above_hps_seeds"] = sum(by_seed["ctal"][s] > by_seed["hps"][s] for s in paired)
    return out


if __name__ == "__main__":
    chosen = _size_from_argv()
    name = "quality" if chosen == "cpu" else f"quality-{chosen}"
    bench_main(name, Path(__file__), configs(chosen), measure, summarise)
