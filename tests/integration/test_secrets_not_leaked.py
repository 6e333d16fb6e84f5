"""Secrets come from the environment and are never logged (issue 9, security).

Planted secret values (S3 keys, the KFP bearer token, an MLflow token, a webhook URL with a
token in it) are put in the environment of `cta train` and `cta register-model`, run as real
processes against the session's MLflow server. Then everything those steps leave behind is
searched for every planted value: their stdout/stderr, the run's params, tags and metric names,
the experiment's tags, the LoggedModel's params and tags, the registered model's and the
version's tags, every artefact of the run and of the LoggedModel (downloaded), and the output
folder. Path traversal out of a dataset root is tested in tests/unit/test_line_dataset.py
(test_path_escaping_the_root, test_symlink_out_of_the_root_is_refused).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import mlflow
import pandas as pd
import pytest
from mlflow import MlflowClient

from cta_model.data.line_dataset import MANIFEST_NAME, sha256_hex

pytestmark = [
    pytest.mark.integration,
    pytest.mark.usefixtures("restore_mlflow_globals"),
    pytest.mark.timeout(900),
]

TRAIN_ARGS = [
    "--config",
    "configs/demo.yaml",
    "--epochs",
    "1",
    "--max-steps",
    "2",
    "--backbone",
    "resnet18",
    "--set",
    "model.output_stride=8",
    "--set",
    "model.input_size=[32,32]",
    "--set",
    "data.synthetic={lines: 1, samples_per_line: 6, size: 32, seed: 0}",
    "--batch-size",
    "2",
]
STEP_TIMEOUT_S = 600


def _cta(args: list[str], env: dict[str, str], cwd: Path) -> str:
    launcher = Path(sys.prefix) / "bin" / "cta"
    result = subprocess.run(
        [str(launcher), *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=STEP_TIMEOUT_S,
        stdin=subprocess.DEVNULL,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    return output


def _texts_of_folder(folder: Path) -> dict[str, bytes]:
    """Every file's bytes, plus the decoded cells of parquet files (compressed on disk)."""
    texts: dict[str, bytes] = {}
    for path in sorted(folder.rglob("*")):
        if not path.is_file():
            continue
        texts[str(path)] = path.read_bytes()
        if path.suffix == ".parquet":
            frame = pd.read_parquet(path)
            texts[f"{path} (cells)"] = frame.to_csv().encode() + " ".join(frame.columns).encode()
    return texts


def _entity_texts(client: MlflowClient, run_id: str, model_id: str, name: str) -> dict[str, str]:
    run = client.get_run(run_id)
    logged = client.get_logged_model(model_id)
    experiment = client.get_experiment(run.info.experiment_id)
    registered = client.get_registered_model(name)
    versions = client.search_model_versions(f"name = '{name}'")
    return {
        "run params": json.dumps(run.data.params),
        "run tags": json.dumps(run.data.tags),
        "run metric names": json.dumps(sorted(run.data.metrics)),
        "run name": str(run.info.run_name),
        "experiment": json.dumps({"name": experiment.name, "tags": experiment.tags}),
        "logged model params": json.dumps(logged.params),
        "logged model tags": json.dumps(logged.tags),
        "logged model metrics": json.dumps([m.key for m in logged.metrics or []]),
        "registered model": json.dumps(
            {"tags": registered.tags, "description": registered.description}
        ),
        "versions": json.dumps(
            [{"tags": v.tags, "description": v.description, "source": v.source} for v in versions]
        ),
    }


def test_planted_secrets_appear_in_no_log_param_tag_or_artefact(
    mlflow_server: str, tmp_path: Path
) -> None:
    tag = uuid.uuid4().hex
    secrets = {
        "AWS_ACCESS_KEY_ID": f"PLANTEDKEYID{tag[:8].upper()}",
        "AWS_SECRET_ACCESS_KEY": f"planted-aws-{tag}",
        "KFP_TOKEN": f"planted-kfp-{tag}",
        "MLFLOW_TRACKING_TOKEN": f"planted-mlflow-{tag}",
        "CTA_WEBHOOK_URL": f"http://127.0.0.1:9/hook?token=planted-webhook-{tag}",
    }
    needles = {name: value.rsplit("=", 1)[-1] for name, value in secrets.items()}
    no_proxy = ",".join(filter(None, ["127.0.0.1,localhost", os.environ.get("NO_PROXY")]))
    env = {
        **os.environ,
        **secrets,
        "NO_PROXY": no_proxy,
        "no_proxy": no_proxy,
        "MLFLOW_TRACKING_URI": mlflow_server,
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "DVC_NO_ANALYTICS": "1",
        "CTA_MODEL_CACHE": str(tmp_path / "model-cache"),
    }
    repo = Path(__file__).resolve().parents[2]
    out = tmp_path / "run"
    summary_path = tmp_path / "train-summary.json"
    experiment = f"cta-secrets-{tag[:8]}"
    print("\ntraining (1 process, 2 steps) with planted secrets in the environment", flush=True)
    logs = {
        "train output": _cta(
            [
                "train",
                *TRAIN_ARGS,
                "--out",
                str(out),
                "--set",
                f"data.cache_dir={tmp_path / 'cache'}",
                "--tracking-uri",
                mlflow_server,
                "--experiment",
                experiment,
                "--summary-out",
                str(summary_path),
            ],
            env,
            repo,
        )
    }
    summary = json.loads(summary_path.read_text())
    (manifest,) = (tmp_path / "cache").rglob(MANIFEST_NAME)  # the generated synthetic dataset
    dataset_ref = tmp_path / "dataset_ref.json"
    ref = {
        "uri": str(manifest.parent),
        "manifest_sha256": sha256_hex(manifest.read_bytes()),
        "dvc_rev": None,
        "passed": True,
        "quarantine": [],
    }
    dataset_ref.write_text(json.dumps(ref))
    name = f"cta-secrets-{tag[:8]}"
    print("registering", flush=True)
    logs["register output"] = _cta(
        [
            "register-model",
            "--model-id",
            summary["model_id"],
            "--name",
            name,
            "--dataset-ref",
            str(dataset_ref),
            "--tracking-uri",
            mlflow_server,
        ],
        env,
        repo,
    )
    assert f"registered {name} version 1" in logs["register output"]

    client = MlflowClient(tracking_uri=mlflow_server, registry_uri=mlflow_server)
    texts: dict[str, bytes] = {
        where: text.encode()
        for where, text in {
            **logs,
            **_entity_texts(client, summary["run_id"], summary["model_id"], name),
        }.items()
    }
    run_files = Path(
        mlflow.artifacts.download_artifacts(
            run_id=summary["run_id"],
            dst_path=str(tmp_path / "run-artifacts"),
            tracking_uri=mlflow_server,
        )
    )
    model_files = Path(
        mlflow.artifacts.download_artifacts(
            artifact_uri=client.get_logged_model(summary["model_id"]).artifact_location,
            dst_path=str(tmp_path / "model-artifacts"),
            tracking_uri=mlflow_server,
        )
    )
    for folder in (run_files, model_files, out, tmp_path / "cache"):
        texts.update(_texts_of_folder(folder))

    # The scan looks where it claims to: the steps' own records are all there.
    assert (run_files / "registration" / "v1" / "dataset_ref.json").is_file(), sorted(texts)
    assert any(path.endswith("weights.safetensors") for path in texts)
    assert any(path.endswith("reference_stats.parquet (cells)") for path in texts)
    assert summary["model_id"].encode() in texts["run tags"]
    print(f"scanned {len(texts)} logs, records and files", flush=True)

    # The search finds what is there: the model name is in the model card the registration
    # attached and in the register step's output.
    canary = _found_in(texts, {"model name": name})
    assert any("registration/v1/model_card.md" in hit for hit in canary), canary
    assert "model name in register output" in canary
    assert _found_in(texts, needles) == []


def _found_in(texts: dict[str, bytes], needles: dict[str, str]) -> list[str]:
    return [
        f"{variable} in {where}"
        for where, text in texts.items()
        for variable, needle in needles.items()
        if needle.encode() in text
    ]
