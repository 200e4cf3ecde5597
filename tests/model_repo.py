"""A demo feature repo with a trained model, built as a user would (scaffold, demo data,
ingest, Dask backfill, materialize, point-in-time export, `tenx train`), through the
Python API: the model server tests serve it from the embedded store or real Redis."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np

from featurestore.config import Settings, load_settings
from featurestore.models import ModelCard, ModelRegistry
from featurestore.plan import Plan, compile_repo
from featurestore.registry import FileRegistry
from featurestore.stores.offline import DeltaOfflineStore, datetime_to_micros
from featurestore.stores.online import open_online_store
from pipelines.batch.engine import backfill
from pipelines.ingest import ingest_file
from pipelines.materialize import materialize
from tenx.demo_data import LABEL, DemoConfig, demo_labels, write_demo_data
from tenx.scaffold import init_repo
from training import export_training_set
from training.train import ModelKind, train_model

USERS = 300


@dataclass
class DemoRepo:
    root: Path
    settings: Settings
    plan: Plan
    training_set: Path
    models: ModelRegistry
    redis_url: str | None

    def store(self) -> Any:
        return open_online_store(
            redis_url=self.redis_url, sqlite_path=self.settings.online_path, project=self.plan.project
        )

    def train(self, name: str, kind: ModelKind) -> ModelCard:
        result = train_model(self.plan, self.training_set, label=LABEL, kind=kind)
        return self.models.add(name, result.onnx, result.card, holdout=result.holdout)


def build_demo_repo(root: Path, *, redis_url: str | None = None, project: str = "models") -> DemoRepo:
    init_repo(root, project=project)
    settings = load_settings(root / "tenx.yaml", environ={})
    plan = compile_repo(settings.features_path, project=settings.project, modules=settings.modules)
    FileRegistry(settings.registry_dir).apply(plan)
    today = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
    events = root / "data" / "tx.parquet"
    write_demo_data(
        events, DemoConfig(events=15_000, users=USERS, merchants=30, days=4, start=today - timedelta(days=4))
    )
    offline = DeltaOfflineStore(settings.offline_dir)
    source = plan.source("transactions")
    ingest_file(offline, source, events)
    backfill(plan, offline, workers=1)
    online = open_online_store(redis_url=redis_url, sqlite_path=settings.online_path, project=plan.project)
    for view in plan.views:
        materialize(view, offline, online, as_of=datetime_to_micros(datetime.now(UTC)))  # not the expiry rows ahead
    online.close()
    training_set = root / "data" / "train.parquet"
    export_training_set(plan, offline, demo_labels(offline.read_events(source), count=4_000), ["user_spend:*"],
                        out=training_set)  # fmt: skip
    return DemoRepo(root, settings, plan, training_set, ModelRegistry(settings.registry_dir / "models"), redis_url)


def feature_matrix(repo: DemoRepo, card: ModelCard, users: list[int]) -> np.ndarray:
    """The model's inputs for `users`, read with the feature client (not the model server's path)."""
    from serving.client import FeatureClient

    client = FeatureClient(repo.store(), repo.plan)
    try:
        views = {ref.view for ref in card.features}
        assert len(views) == 1
        result = client.get(views.pop(), users, features=[ref.feature for ref in card.features])
        return result.to_numpy().astype(np.float32)
    finally:
        client.close()


def onnx_scores(repo: DemoRepo, card: ModelCard, matrix: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(
        str(repo.models.model_path(card.name, card.version)), providers=["CPUExecutionProvider"]
    )
    (output,) = session.run([card.output_name], {card.input_name: matrix})
    return np.asarray(output)[:, card.output_index]


def with_two_models(repo: DemoRepo) -> DemoRepo:
    """`repo` with an MLP deployed as `buys` and a logistic model as `buys_logistic`."""
    from training.train import ModelKind

    for name, kind in (("buys", ModelKind.MLP), ("buys_logistic", ModelKind.LOGISTIC)):
        card = repo.train(name, kind)
        repo.models.deploy(name, card.version, precision=None, by="test")
    return repo
