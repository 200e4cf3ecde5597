"""The model server end to end on the embedded store: models trained in the test from
demo data (`tenx train`'s code), deployed, served over the ASGI app, and checked
against ONNX Runtime run in-process on vectors read with the feature client."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from starlette.testclient import TestClient

from featurestore import route
from featurestore.models import MissingPolicy, ModelCard, Precision, SkewError, check_views
from featurestore.plan import compile_repo
from featurestore.registry import FileRegistry
from serving.models import ModelServerSettings, create_model_app
from tests.model_repo import USERS, DemoRepo, build_demo_repo, feature_matrix, onnx_scores
from training.train import ModelKind
from training.variants import make_variants


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> DemoRepo:
    repo = build_demo_repo(tmp_path_factory.mktemp("models") / "repo")
    for name, kind in (("buys", ModelKind.MLP), ("buys_logistic", ModelKind.LOGISTIC)):
        card = repo.train(name, kind)
        make_variants(repo.models, name, card.version)
        repo.models.deploy(name, card.version, precision=None, by="test")
    return repo


@pytest.fixture
def client(repo: DemoRepo) -> Iterator[TestClient]:
    settings = ModelServerSettings(registry_dir=repo.settings.registry_dir, reload_interval_s=0.1)
    with TestClient(create_model_app(settings, repo.store())) as test_client:
        yield test_client


def predict(client: TestClient, body: dict[str, Any], status: int = 200) -> dict[str, Any]:
    response = client.post("/predict", json=body)
    assert response.status_code == status, response.text
    return dict(response.json())


def test_scores_equal_onnx_runtime_in_process_on_the_same_vectors(repo: DemoRepo, client: TestClient) -> None:
    users = list(range(1, USERS + 1))
    for name in ("buys", "buys_logistic"):
        card = repo.models.card(name)
        answer = predict(client, {"model": name, "entities": users})
        expected = onnx_scores(repo, card, feature_matrix(repo, card, users))
        got = np.array(answer["scores"], dtype=np.float64)
        assert np.max(np.abs(got - expected)) <= 1e-6
        assert answer["served_by"] == f"{name}@1"
        assert (answer["precision"], answer["device"], answer["degraded"]) == ("fp32", "cpu", False)
        assert set(answer["status"]) <= {"found", "missing"}
        assert answer["status"].count("found") > USERS // 2
        found = [i for i, s in enumerate(answer["status"]) if s == "found"]
        assert all(answer["read_at_ms"] >= answer["as_of_ms"][i] for i in found)


def test_single_entity_requests_batch_together_and_each_gets_its_own_score(repo: DemoRepo, client: TestClient) -> None:
    card = repo.models.card("buys")
    users = list(range(1, 41))
    answers: dict[int, float] = {}

    def ask(user: int) -> None:
        answers[user] = predict(client, {"model": "buys", "entities": [user]})["scores"][0]

    threads = [threading.Thread(target=ask, args=(user,)) for user in users]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    expected = onnx_scores(repo, card, feature_matrix(repo, card, users))
    assert np.max(np.abs(np.array([answers[u] for u in users]) - expected)) <= 1e-6
    metrics = client.get("/metrics").text
    assert 'tenx_model_batch_rows_count{model="buys"}' in metrics
    assert 'tenx_model_requests_total{model="buys",outcome="ok",priority="default"}' in metrics


def test_a_missing_entity_is_scored_on_empty_window_values_and_says_missing(repo: DemoRepo, client: TestClient) -> None:
    card = repo.models.card("buys")
    answer = predict(client, {"model": "buys", "entities": [10**12, "1"]})
    assert answer["status"][0] == "missing"
    assert answer["as_of_ms"][0] is None
    assert isinstance(answer["read_at_ms"], int)
    empty = np.array(
        [[0.0 if ref.feature.startswith(("count_", "sum_")) else np.nan for ref in card.features]], dtype=np.float32
    )
    assert abs(answer["scores"][0] - onnx_scores(repo, card, empty)[0]) <= 1e-6
    assert card.on_missing is MissingPolicy.EMPTY_WINDOW


def test_a_card_that_refuses_missing_values_gives_no_score(repo: DemoRepo, tmp_path: Path) -> None:
    from dataclasses import replace

    card = repo.models.card("buys_logistic")
    model = repo.models.model_path(card.name, card.version).read_bytes()
    strict = repo.models.add("buys_strict", model, replace(card, on_missing=MissingPolicy.REFUSE, source="test"))
    repo.models.deploy("buys_strict", strict.version, precision=None, by="test")
    settings = ModelServerSettings(registry_dir=repo.settings.registry_dir, models=("buys_strict",))
    with TestClient(create_model_app(settings, repo.store())) as client:
        answer = predict(client, {"model": "buys_strict", "entities": [10**12, 1]})
    assert answer["scores"][0] is None
    assert answer["status"][0] == "missing"
    assert answer["scores"][1] is not None


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("not json", "the body must be JSON"),
        ('{"model": "buys"}', "`entities` must be a non-empty list of entity keys (integers or strings)"),
        ('{"entities": [1]}', '`model` must name a served model, e.g. "model": "buys" (GET /models lists them)'),
        ('{"model": "buys", "entities": [1.5]}', "`entities` must hold integers or strings; entities[0] is 1.5"),
        ('{"model": "buys", "entities": [1], "priority": "urgent"}',
         "`priority`: priority 'urgent': expected critical, default or sheddable"),
        ('{"model": "buys", "entities": [1], "deadline_ms": -5}',
         "`deadline_ms` must be a number of milliseconds in (0, 600000]; got -5"),
        ('{"model": "buys", "entities": [1], "colour": 1}',
         "unknown field(s) colour; expected model, entities, priority, tenant, deadline_ms"),
        ('{"model": "buys", "entities": ["abc"]}',
         "entity 'abc' (entities[0]) is not an int64 `user_id`: view `user_spend` takes integers or strings of digits"),
    ],
)  # fmt: skip
def test_bad_bodies_are_400_saying_what_to_send(client: TestClient, body: str, message: str) -> None:
    response = client.post("/predict", content=body, headers={"content-type": "application/json"})
    assert response.status_code == 400
    assert response.json()["error"].startswith(message)


def test_an_unknown_model_is_404_naming_the_served_ones(client: TestClient) -> None:
    response = client.post("/predict", json={"model": "buy", "entities": [1]})
    assert response.status_code == 404
    assert response.json()["error"] == "unknown model `buy` (served: buys, buys_logistic, buys_strict)" or (
        response.json()["error"] == "unknown model `buy` (served: buys, buys_logistic)"
    )


def test_a_request_whose_deadline_passed_in_the_queue_is_504_and_counted(client: TestClient) -> None:
    response = client.post("/predict", json={"model": "buys", "entities": [1], "deadline_ms": 0.0001})
    assert response.status_code == 504
    assert response.json()["reason"] == "deadline"
    assert "deadline passed" in response.json()["error"]
    metrics = client.get("/metrics").text
    assert 'tenx_model_requests_total{model="buys",outcome="deadline",priority="default"}' in metrics
    assert 'tenx_model_shed_total{model="buys",priority="default",reason="deadline",tenant="default"}' in metrics
    header = client.post("/predict", json={"model": "buys", "entities": [1]}, headers={"x-deadline-ms": "0.0001"})
    assert header.status_code == 504


def test_ready_lists_models_with_precision_and_device(client: TestClient) -> None:
    ready = client.get("/health/ready")
    assert ready.status_code == 200
    models = {m["model"]: m for m in ready.json()["models"]}
    assert models["buys"]["version"] == 1
    assert models["buys"]["precision"] == "fp32"
    assert models["buys"]["features"][0] == "user_spend:count_1h"
    assert client.get("/health/live").json() == {"status": "ok"}


def test_with_a_token_set_models_are_listed_to_token_holders_and_probes_still_get_the_status(repo: DemoRepo) -> None:
    """Model versions, features, routes and costs are for token holders; a readiness
    probe needs only the status code (and sees the circuits)."""
    settings = ModelServerSettings(registry_dir=repo.settings.registry_dir)
    with TestClient(create_model_app(settings, repo.store(), token="s3cret")) as client:
        holder = {"authorization": "Bearer s3cret"}
        assert client.get("/models").status_code == 401
        assert client.get("/models", headers={"authorization": "Bearer wrong"}).status_code == 401
        assert "missing or wrong bearer token" in client.get("/models").json()["error"]
        assert "buys" in {m["model"] for m in client.get("/models", headers=holder).json()["models"]}
        probe = client.get("/health/ready")
        assert probe.status_code == 200
        assert probe.json() == {"status": "ok", "circuits": probe.json()["circuits"]}
        assert "models" in client.get("/health/ready", headers=holder).json()


def test_a_new_deployment_is_picked_up_warm_with_no_failed_request(repo: DemoRepo) -> None:
    settings = ModelServerSettings(registry_dir=repo.settings.registry_dir, models=("buys",), reload_interval_s=0.05)
    failures: list[str] = []
    served: set[str] = set()
    stop = threading.Event()
    with TestClient(create_model_app(settings, repo.store())) as client:

        def hammer() -> None:
            while not stop.is_set():
                response = client.post("/predict", json={"model": "buys", "entities": [1, 2, 3]})
                if response.status_code != 200:
                    failures.append(response.text)
                else:
                    served.add(response.json()["served_by"])

        threads = [threading.Thread(target=hammer) for _ in range(4)]
        for thread in threads:
            thread.start()
        try:
            time.sleep(0.3)
            card = repo.train("buys", ModelKind.GBDT)
            repo.models.deploy("buys", card.version, precision=None, by="test")
            give_up = time.monotonic() + 30
            while f"buys@{card.version}" not in served and time.monotonic() < give_up:
                time.sleep(0.05)
            time.sleep(0.2)
        finally:
            stop.set()
            for thread in threads:
                thread.join()
        repo.models.deploy("buys", 1, precision=None, by="test")  # back, for the other tests
    assert failures == []
    assert served == {"buys@1", f"buys@{card.version}"}


def test_a_model_trained_on_another_view_version_refuses_to_serve(repo: DemoRepo, tmp_path: Path) -> None:
    card = repo.models.card("buys")
    features = repo.root / "features.py"
    original = features.read_text()
    registry = FileRegistry(repo.settings.registry_dir)
    try:
        features.write_text(original.replace('windows=["1h", "1d", "7d"]', 'windows=["1h", "1d", "8d"]', 1))
        changed = compile_repo(
            repo.settings.features_path, project=repo.settings.project, modules=repo.settings.modules
        )
        registry.apply(changed)
        with pytest.raises(SkewError) as raised:
            check_views(card, changed)
        view_version = changed.view("user_spend").version
        assert str(raised.value) == (
            f"model buys@1 will not serve: view `user_spend` is at version {view_version}, the model was trained on "
            f"{card.features[0].view_version}. Its features would differ from training. Export a training set "
            "from the applied plan and `tenx train` a new version (then `tenx models deploy`), or `tenx apply` the "
            f"plan it was trained on ({repo.plan.version})"
        )
        settings = ModelServerSettings(registry_dir=repo.settings.registry_dir, models=("buys",))
        with TestClient(create_model_app(settings, repo.store())) as client:
            response = client.post("/predict", json={"model": "buys", "entities": [1]})
            assert response.status_code == 409
            assert response.json()["error"] == str(raised.value)
            ready = client.get("/health/ready")
            assert ready.status_code == 503
            assert str(raised.value) in ready.json()["problems"]
        # Neither a canary of such a version nor its promotion: promoted, it took the model down.
        from click.testing import CliRunner

        from tenx.cli import main

        other = repo.train("buys", ModelKind.LOGISTIC)  # trained on the plan before the change
        config = ["--config", str(repo.root / "tenx.yaml")]
        started = CliRunner().invoke(main, ["models", "canary", f"buys@{other.version}", *config])
        assert started.exit_code == 2, started.output
        assert "will not serve" in started.output
        assert repo.models.canary("buys") is None
        repo.models.start_canary("buys", other.version, percent=5, shadow=False, by="test")  # before the change
        promoted = CliRunner().invoke(main, ["models", "promote", "buys", *config])
        assert promoted.exit_code == 2, promoted.output
        assert "will not serve" in promoted.output
        assert repo.models.deployment("buys").version == card.version
    finally:
        if repo.models.canary("buys") is not None:
            repo.models.rollback("buys", by="test", reason="test")
        features.write_text(original)
        registry.apply(repo.plan)


def test_precision_variants_are_checked_and_a_failing_one_is_refused(repo: DemoRepo) -> None:
    card = repo.models.card("buys", 1)
    variants = repo.models.variants("buys", 1)
    fp16 = variants[Precision.FP16]
    assert fp16.accepted
    assert fp16.auc_delta is not None
    assert abs(fp16.auc_delta) <= 0.005
    assert fp16.max_abs_diff is not None
    assert 0 < fp16.max_abs_diff < 0.01
    assert repo.models.model_path("buys", 1, Precision.FP16).exists()
    # A limit no variant can meet (AUC must rise by 1): refused with the numbers, no file.
    refused = make_variants(repo.models, "buys", card.version, precisions=[Precision.INT8], max_auc_drop=-1.0)
    assert not refused[0].accepted
    assert refused[0].reason.startswith("refused: holdout AUC ")
    assert "limit --1.0" in refused[0].reason
    assert "max |score difference|" in refused[0].reason
    from featurestore.errors import RegistryError

    with pytest.raises(RegistryError, match="buys@1 has no accepted int8 variant: refused: holdout AUC"):
        repo.models.deploy("buys", 1, precision=Precision.INT8, by="test")
    logistic = repo.models.variants("buys_logistic", 1)
    assert logistic[Precision.FP16].reason == "nothing to lower in this graph (no MatMul/Gemm)"
    make_variants(repo.models, "buys", card.version)  # restore the accepted ones


def test_an_fp16_deployment_serves_fp16_scores_close_to_fp32(repo: DemoRepo) -> None:
    repo.models.deploy("buys", 1, precision=Precision.FP16, by="test")
    try:
        settings = ModelServerSettings(registry_dir=repo.settings.registry_dir, models=("buys",))
        with TestClient(create_model_app(settings, repo.store())) as client:
            answer = predict(client, {"model": "buys", "entities": list(range(1, 101))})
        card: ModelCard = repo.models.card("buys", 1)
        expected = onnx_scores(repo, card, feature_matrix(repo, card, list(range(1, 101))))
        assert answer["precision"] == "fp16"
        difference = np.max(np.abs(np.array(answer["scores"]) - expected))
        assert 0 < difference < 0.01
    finally:
        repo.models.deploy("buys", 1, precision=None, by="test")


class Recording:
    """A guard that refuses one dependency and records every outcome."""

    def __init__(self, refuse: str) -> None:
        self.refuse = refuse
        self.calls: list[tuple[str, bool]] = []

    def allow(self, dependency: str) -> bool:
        return dependency != self.refuse

    def record(self, dependency: str, *, ok: bool, seconds: float) -> None:
        self.calls.append((dependency, ok))

    def release(self, dependency: str) -> None:
        pass


def test_a_routing_function_picks_the_model_and_the_guard_is_asked_around_every_call(repo: DemoRepo) -> None:
    settings = ModelServerSettings(registry_dir=repo.settings.registry_dir, models=("buys", "buys_logistic"))
    guard = Recording(refuse="model:buys")

    @route("buys", primary="buys")
    def cheap_for_sheddable(request: Any) -> str | None:
        return "buys_logistic" if request.priority == "sheddable" else None

    app = create_model_app(settings, repo.store(), guard=guard, routes={"buys": cheap_for_sheddable})
    with TestClient(app) as client:
        routed = predict(client, {"model": "buys", "entities": [1], "priority": "sheddable"})
        assert (routed["served_by"], routed["degraded"], routed["route"]) == ("buys_logistic@1", False, "buys")
        metrics = client.get("/metrics").text
    assert guard.calls == [("online_store", True), ("model:buys_logistic", True)]
    served = 'tenx_model_served_total{priority="sheddable",route="buys",served_by="buys_logistic",tenant="default"}'
    assert f"{served} 1.0" in metrics
    refusing = create_model_app(settings, repo.store(), guard=Recording(refuse="model:buys"))
    with TestClient(refusing) as client:
        response = client.post("/predict", json={"model": "buys", "entities": [1]})
    assert response.status_code == 503
    assert response.json()["error"] == (
        "route `buys` could not answer: buys: model `buys`'s circuit is open; retry shortly"
    )


def test_a_model_of_an_offline_only_view_is_refused_not_served_empty_windows(repo: DemoRepo) -> None:
    """Neither materialize nor the stream writes an offline-only view: a model trained on
    one passed the version check and scored every entity on empty windows."""
    from dataclasses import replace

    plan = repo.plan
    card = repo.models.card("buys", 1)
    view = next(iter(card.views()))
    offline = replace(plan, views=tuple(replace(v, online=False) if v.name == view else v for v in plan.views))
    assert offline.view(view).version == plan.view(view).version  # `online` is not part of the version
    check_views(card, plan)
    with pytest.raises(SkewError, match=f"view `{view}` is offline only \\(online=False\\): nothing serves its values"):
        check_views(card, offline)


def test_training_keeps_the_exports_max_age_and_refuses_another_plan(repo: DemoRepo, tmp_path: Path) -> None:
    """The card recorded neither: a set exported with --max-age trained on blanked values
    the server then fed unblanked, and one trained against another plan's view versions
    passed the skew check against that plan."""
    from dataclasses import replace

    from featurestore.stores.offline import DeltaOfflineStore
    from tenx.demo_data import LABEL, demo_labels
    from training import export_training_set
    from training.errors import TrainingError
    from training.train import train_model

    offline = DeltaOfflineStore(repo.settings.offline_dir)
    labels = demo_labels(offline.read_events(repo.plan.source("transactions")), count=2_000)
    out = tmp_path / "aged.parquet"
    export_training_set(repo.plan, offline, labels, ["user_spend:*"], out=out, max_age=3_600_000_000)
    trained = train_model(repo.plan, out, label=LABEL)
    assert trained.card.max_age_us == 3_600_000_000
    assert repo.models.card("buys", 1).max_age_us is None  # exported without it
    other = replace(repo.plan, project="another")  # any other plan version
    assert other.version != repo.plan.version
    with pytest.raises(TrainingError, match=f"was exported from plan {repo.plan.version}, not {other.version}"):
        train_model(other, out, label=LABEL)


def test_the_server_reads_the_renamed_projects_keys_after_an_apply(repo: DemoRepo) -> None:
    """View versions do not name the project, so a model stays loaded across a project
    rename, and read the old project's keys (frozen since the apply)."""
    from dataclasses import replace

    renamed = replace(repo.plan, project="renamed")
    registry = FileRegistry(repo.settings.registry_dir)
    settings = ModelServerSettings(registry_dir=repo.settings.registry_dir, models=("buys",), reload_interval_s=0.05)
    try:
        with TestClient(create_model_app(settings, repo.store())) as client:
            server = client.app.state.server  # type: ignore[attr-defined]
            assert server.store.prefix == f"tenx:{repo.plan.project}"
            registry.apply(renamed)
            deadline = time.monotonic() + 10
            while server.store.prefix != "tenx:renamed":
                assert time.monotonic() < deadline, server.store.prefix
                time.sleep(0.05)
            answer = client.post("/predict", json={"model": "buys", "entities": [1]}).json()
            assert answer["status"] == ["missing"]  # nothing materialized for `renamed` yet: not the old values
    finally:
        registry.apply(repo.plan)
