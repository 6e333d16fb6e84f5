"""`cta pipeline submit` / `schedule` against a loopback stand-in of the KFP v2beta1 API.

The stand-in records every request; the tests assert the calls kfp.Client made, the compiled
pipeline spec that travelled, the run parameters, the 6-field cron and the bearer token.
"""

import json

import pytest
import yaml
from click.testing import CliRunner
from kfp_standin import API, KfpStandIn

from components.image import GPU_IMAGE, PROJECT_IMAGE
from cta_cli.commands.pipeline import pipeline
from pipelines.remote import normalise_cron

pytestmark = pytest.mark.integration

PARAMS = {
    "data_uri": "s3://cta-data/lines/v3",
    "config_path": "/configs/train.yaml",
    "tracking_uri": "http://mlflow.cta-platform.svc:5000",
}
TOKEN = "test-token-4d1f9a"


@pytest.fixture(autouse=True)
def _isolated_kfp_context(tmp_path, monkeypatch):
    # kfp.Client reads (and may write) ~/.config/kfp/context.json; keep the user's out of it.
    import kfp.client.client as kfp_client

    monkeypatch.setattr(
        kfp_client.Client, "_LOCAL_KFP_CONTEXT", str(tmp_path / "kfp" / "context.json")
    )
    for name in ("KFP_TOKEN", "MLFLOW_TRACKING_URI", "KF_PIPELINES_OVERRIDE_EXPERIMENT_NAME"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def kfp_server():
    with KfpStandIn() as server:
        yield server


def invoke(args, env=None):
    return CliRunner().invoke(pipeline, args, env=env, catch_exceptions=False)


def param_flags(params=PARAMS):
    return [flag for key, value in params.items() for flag in ("--param", f"{key}={value}")]


def assert_is_training_pipeline(spec: dict, platform: dict) -> None:
    """The pipeline spec, and its kfp-kubernetes settings (Secrets, timeouts) sent beside it."""
    assert spec["pipelineInfo"]["name"] == "cta-training"
    executors = spec["deploymentSpec"]["executors"]
    assert set(platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]) == set(executors)
    assert set(executors) == {
        "exec-validate-data",
        "exec-data-fingerprint",
        "exec-train-baselines",
        "exec-train",
        "exec-train-trainjob",
        "exec-evaluate",
        "exec-roi-report",
        "exec-register-model",
        "exec-gate",
        "exec-rollout",
    }
    # Training runs in the GPU build of the image, every other step in the project image.
    assert {name: e["container"]["image"] for name, e in executors.items()} == {
        name: GPU_IMAGE if name == "exec-train" else PROJECT_IMAGE for name in executors
    }


def test_submit_creates_experiment_and_run_with_inline_spec(kfp_server):
    result = invoke(
        ["submit", "--host", kfp_server.url, "--run-name", "nightly-1", "--json"]
        + ["--experiment", "cta-nightly", "--service-account", "cta-pipeline-runner"]
        + param_flags(),
        env={"KFP_TOKEN": TOKEN},
    )
    assert result.exit_code == 0, result.output
    assert TOKEN not in result.output

    assert kfp_server.calls() == [
        ("GET", f"{API}/healthz"),
        ("GET", f"{API}/experiments"),
        ("POST", f"{API}/experiments"),
        ("POST", f"{API}/runs"),
    ]
    assert {r.headers.get("authorization") for r in kfp_server.requests} == {f"Bearer {TOKEN}"}
    lookup = json.loads(kfp_server.requests[1].query["filter"][0])
    assert lookup["predicates"][0]["stringValue"] == "cta-nightly"
    experiment = kfp_server.requests[2].body
    assert experiment["display_name"] == "cta-nightly"

    run = kfp_server.find("POST", f"{API}/runs")[0].body
    assert run["display_name"] == "nightly-1"
    assert run["service_account"] == "cta-pipeline-runner"
    assert run["experiment_id"] == next(iter(kfp_server.experiments))
    assert run["runtime_config"]["parameters"] == PARAMS
    assert "pipeline_version_reference" not in run
    assert_is_training_pipeline(
        run["pipeline_spec"]["pipeline_spec"], run["pipeline_spec"]["platform_spec"]
    )

    printed = json.loads(result.stdout)
    assert printed["run_id"] == next(iter(kfp_server.runs))
    assert printed["run_name"] == "nightly-1"


def test_submit_reuses_an_existing_experiment(kfp_server):
    for _ in range(2):
        assert invoke(["submit", "--host", kfp_server.url] + param_flags()).exit_code == 0
    assert len(kfp_server.find("POST", f"{API}/experiments")) == 1
    runs = kfp_server.find("POST", f"{API}/runs")
    assert len(runs) == 2
    assert {r.body["experiment_id"] for r in runs} == set(kfp_server.experiments)
    assert all("authorization" not in r.headers for r in kfp_server.requests)


def test_schedule_uploads_a_version_and_creates_a_6_field_cron_recurring_run(kfp_server):
    result = invoke(
        ["schedule", "--host", kfp_server.url, "--cron", "0 */6 * * *", "--json"]
        + ["--name", "cta-retrain", "--max-concurrency", "2", "--token", TOKEN]
        + param_flags()
    )
    assert result.exit_code == 0, result.output
    assert TOKEN not in result.output

    paths = [path for _, path in kfp_server.calls()]
    assert paths[0] == f"{API}/healthz"
    assert paths.index(f"{API}/pipelines/upload") < paths.index(f"{API}/recurringruns")
    upload = kfp_server.find("POST", f"{API}/pipelines/upload")[0]
    assert upload.query["name"] == ["cta-training"]
    assert_is_training_pipeline(*yaml.safe_load_all(upload.body["uploadfile"]))
    (pipeline_id,) = kfp_server.pipelines
    (version,) = kfp_server.versions[pipeline_id]

    (recurring_request,) = kfp_server.find("POST", f"{API}/recurringruns")
    recurring = recurring_request.body
    assert recurring_request.headers["authorization"] == f"Bearer {TOKEN}"
    assert recurring["trigger"] == {"cron_schedule": {"cron": "0 0 */6 * * *"}}
    assert recurring["display_name"] == "cta-retrain"
    assert int(recurring["max_concurrency"]) == 2
    assert recurring["no_catchup"] is True
    assert recurring["mode"] == "ENABLE"
    assert recurring["runtime_config"]["parameters"] == PARAMS
    assert recurring["pipeline_version_reference"] == {
        "pipeline_id": pipeline_id,
        "pipeline_version_id": version["pipeline_version_id"],
    }
    assert "pipeline_spec" not in recurring  # the version holds the spec
    assert recurring["experiment_id"] == next(iter(kfp_server.experiments))

    printed = json.loads(result.stdout)
    assert printed["cron"] == "0 0 */6 * * *"
    assert printed["recurring_run_id"] == next(iter(kfp_server.recurring_runs))


def test_second_schedule_adds_a_pipeline_version(kfp_server):
    for cron in ("30 2 * * 1-5", "0 15 3 * * MON-FRI"):
        result = invoke(["schedule", "--host", kfp_server.url, "--cron", cron] + param_flags())
        assert result.exit_code == 0, result.output
    assert len(kfp_server.find("POST", f"{API}/pipelines/upload")) == 1
    (upload_version,) = kfp_server.find("POST", f"{API}/pipelines/upload_version")
    (pipeline_id,) = kfp_server.pipelines
    assert upload_version.query["pipelineid"] == [pipeline_id]
    assert_is_training_pipeline(*yaml.safe_load_all(upload_version.body["uploadfile"]))
    first, second = (r.body for r in kfp_server.find("POST", f"{API}/recurringruns"))
    assert first["trigger"]["cron_schedule"]["cron"] == "0 30 2 * * 1-5"
    assert second["trigger"]["cron_schedule"]["cron"] == "0 15 3 * * MON-FRI"  # 6 fields kept
    versions = [v["pipeline_version_id"] for v in kfp_server.versions[pipeline_id]]
    assert [
        first["pipeline_version_reference"]["pipeline_version_id"],
        second["pipeline_version_reference"]["pipeline_version_id"],
    ] == versions


def test_catchup_flag_reaches_the_recurring_run(kfp_server):
    result = invoke(
        ["schedule", "--host", kfp_server.url, "--cron", "@daily", "--catchup"] + param_flags()
    )
    assert result.exit_code == 0, result.output
    (recurring,) = kfp_server.find("POST", f"{API}/recurringruns")
    assert recurring.body["no_catchup"] is False
    assert recurring.body["trigger"]["cron_schedule"]["cron"] == "@daily"


@pytest.mark.parametrize(
    ("cron", "why"),
    [
        ("*/6 * * *", "expected 5 fields"),
        ("0 */6 * * * * *", "got 7"),
        ("61 * * * *", "minutes field '61'"),
        ("0 24 * * *", "hours field '24'"),
        ("0 0 0 * *", "day-of-month field '0'"),
        ("0 0 * 13 *", "month field '13'"),
        ("0 0 * * 7", "day-of-week field '7'"),
        ("0 0 * * FOO", "not a number or a name"),
        ("*/0 * * * *", "step of 0"),
        ("0 5-1 * * *", "runs backwards"),
        ("? * * * *", "'?' is allowed only"),
        ("0 0 * * 1,", "cannot parse"),
        ("@sometimes", "expected 5 fields"),
    ],
)
def test_malformed_cron_is_rejected_before_any_request(kfp_server, cron, why):
    result = CliRunner().invoke(
        pipeline, ["schedule", "--host", kfp_server.url, "--cron", cron] + param_flags()
    )
    assert result.exit_code == 2
    assert "--cron" in result.output and why in result.output
    assert kfp_server.requests == []


def test_cron_normalisation():
    assert normalise_cron("0 */6 * * *") == "0 0 */6 * * *"
    assert normalise_cron("  15  3 * *   SUN ") == "0 15 3 * * SUN"
    assert normalise_cron("0 0 12 ? * MON") == "0 0 12 ? * MON"
    assert normalise_cron("@Hourly") == "@hourly"


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--param", "nonsense"], "expected KEY=VALUE"),
        (["--param", "batch_size=3"], "not a parameter of pipeline cta-training"),
        (["--param", "data_uri=/a", "--param", "data_uri=/b"], "given twice"),
    ],
)
def test_bad_params_are_rejected_naming_the_flag(kfp_server, flags, message):
    result = CliRunner().invoke(pipeline, ["submit", "--host", kfp_server.url] + flags)
    assert result.exit_code != 0
    text = result.output + str(result.exception or "")
    assert "--param" in text and message in text
    assert kfp_server.requests == []  # refused before the client is made


def test_missing_required_params_are_named(kfp_server):
    partial = {k: v for k, v in PARAMS.items() if k != "tracking_uri"}
    result = CliRunner().invoke(
        pipeline, ["submit", "--host", kfp_server.url] + param_flags(partial)
    )
    assert result.exit_code != 0
    assert "tracking_uri" in str(result.exception) and "MLFLOW_TRACKING_URI" in str(
        result.exception
    )
    assert kfp_server.requests == []  # refused before the client is made


def test_tracking_uri_defaults_to_the_environment(kfp_server):
    partial = {k: v for k, v in PARAMS.items() if k != "tracking_uri"}
    result = invoke(
        ["submit", "--host", kfp_server.url] + param_flags(partial),
        env={"MLFLOW_TRACKING_URI": "http://mlflow.example:5000"},
    )
    assert result.exit_code == 0, result.output
    (run,) = kfp_server.find("POST", f"{API}/runs")
    assert run.body["runtime_config"]["parameters"]["tracking_uri"] == "http://mlflow.example:5000"


def test_host_without_scheme_is_rejected():
    result = CliRunner().invoke(pipeline, ["submit", "--host", "kfp.example"] + param_flags())
    assert result.exit_code != 0
    assert "--host" in str(result.exception)
