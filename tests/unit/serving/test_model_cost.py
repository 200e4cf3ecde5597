"""Cost attribution on the model server: each batch's device time is split over its
requests by rows, priced at the configured rates, and adds up to the device time the
runtime measured (two tenants, two models, known rows)."""

from __future__ import annotations

import re
import threading

import pytest
from starlette.testclient import TestClient

from featurestore.errors import ConfigError
from serving.models import ModelServerSettings, create_model_app
from serving.models.batcher import Pending, Priority
from serving.models.config import cost_rates
from serving.models.cost import CostRates, split_by_rows
from serving.models.served import Work
from tests.model_repo import DemoRepo, build_demo_repo, with_two_models

RATES = CostRates(cpu_hour=3.6, gpu_hour=36.0, lookups_per_million=1.0)  # 0.001 USD per CPU-second


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> DemoRepo:
    return with_two_models(build_demo_repo(tmp_path_factory.mktemp("cost") / "repo"))


def samples(text: str, name: str) -> list[tuple[dict[str, str], float]]:
    found = []
    for line in text.splitlines():
        match = re.match(rf"{name}\{{(.*)\}} ([0-9.e+-]+)$", line)
        if match:
            labels = dict(re.findall(r'(\w+)="([^"]*)"', match.group(1)))
            found.append((labels, float(match.group(2))))
    return found


def total(text: str, name: str, **wanted: str) -> float:
    return sum(v for labels, v in samples(text, name) if all(labels.get(k) == w for k, w in wanted.items()))


def test_attributed_device_time_adds_up_to_the_measured_total_per_model(repo: DemoRepo) -> None:
    settings = ModelServerSettings(registry_dir=repo.settings.registry_dir)
    with TestClient(create_model_app(settings, repo.store(), costs=RATES)) as client:

        def send(model: str, tenant: str, rows: int, times: int) -> None:
            for index in range(times):
                body = {"model": model, "entities": list(range(1, rows + 1)), "tenant": tenant}
                assert client.post("/predict", json=body).status_code == 200, index

        threads = [
            threading.Thread(target=send, args=(model, tenant, rows, 20))
            for model, tenant, rows in (("buys", "a", 3, ), ("buys", "b", 9), ("buys_logistic", "a", 5),
                                        ("buys_logistic", "b", 1))
        ]  # fmt: skip
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        text = client.get("/metrics").text
    for model in ("buys", "buys_logistic"):
        measured = total(text, "tenx_model_device_seconds_total", model=model)
        attributed = total(text, "tenx_model_cost_device_seconds_total", model=model)
        assert measured > 0
        assert attributed == pytest.approx(measured, rel=0.05)
        dollars = total(text, "tenx_model_cost_dollars_total", model=model)
        lookups = sum(
            v for labels, v in samples(text, "tenx_model_served_predictions_total") if labels["served_by"] == model
        )
        views = 1  # the demo models read one view
        assert dollars == pytest.approx(attributed * 0.001 + lookups * views * 1e-6, rel=0.05)
    served = {
        (labels["served_by"], labels["tenant"]): v for labels, v in samples(text, "tenx_model_served_predictions_total")
    }
    assert served == {("buys", "a"): 60, ("buys", "b"): 180, ("buys_logistic", "a"): 100, ("buys_logistic", "b"): 20}


def test_a_batch_shared_by_two_tenants_is_split_in_proportion_to_rows(repo: DemoRepo) -> None:
    settings = ModelServerSettings(registry_dir=repo.settings.registry_dir)
    with TestClient(create_model_app(settings, repo.store(), costs=RATES)) as client:
        server = client.app.state.server  # type: ignore[attr-defined]
        loaded = server.routes["buys"].loaded
        items = [
            Pending(deadline=1e9, rows=rows, priority=Priority.DEFAULT, tenant=tenant,
                    payload=Work([], None, "buys", tenant))  # type: ignore[arg-type]
            for tenant, rows in (("small", 1), ("big", 3))
        ]  # fmt: skip
        server.cost.charge_device(loaded, items, 2.0)
        text = client.get("/metrics").text
    small = total(text, "tenx_model_cost_device_seconds_total", tenant="small")
    big = total(text, "tenx_model_cost_device_seconds_total", tenant="big")
    assert (small, big) == (pytest.approx(0.5), pytest.approx(1.5))
    assert total(text, "tenx_model_cost_dollars_total", tenant="big") == pytest.approx(1.5 * 0.001)


def test_split_by_rows_and_the_rates_config() -> None:
    assert split_by_rows(1.0, [1, 1, 2]) == [0.25, 0.25, 0.5]
    assert split_by_rows(1.0, []) == []
    assert cost_rates({"costs": {"gpu_hour": 4}}).gpu_hour == 4.0
    assert cost_rates({}).cpu_hour == CostRates().cpu_hour
    with pytest.raises(ConfigError, match=r"model_server\.costs: unknown key\(s\) tpu_hour"):
        cost_rates({"costs": {"tpu_hour": 1}})
    with pytest.raises(ConfigError, match=r"model_server\.costs\.cpu_hour must be a price in USD"):
        cost_rates({"costs": {"cpu_hour": -1}})


@pytest.mark.parametrize("shedding", [True, False])
def test_cost_is_attributed_to_the_requests_class_with_or_without_shedding(repo: DemoRepo, shedding: bool) -> None:
    """The no-shedding baseline queues every class as one FIFO class: its cost metrics
    labelled every request `default`, so the bench's cost per class compared nothing."""
    settings = ModelServerSettings(registry_dir=repo.settings.registry_dir, shedding=shedding)
    with TestClient(create_model_app(settings, repo.store(), costs=RATES)) as client:
        for priority, rows in (("critical", 2), ("sheddable", 4), ("critical", 2)):
            body = {"model": "buys", "entities": list(range(1, rows + 1)), "priority": priority}
            assert client.post("/predict", json=body).status_code == 200
        text = client.get("/metrics").text
    lookups = {labels["priority"]: v for labels, v in samples(text, "tenx_model_cost_dollars_total")}
    assert sorted(lookups) == ["critical", "sheddable"]
    device = {labels["priority"]: v for labels, v in samples(text, "tenx_model_cost_device_seconds_total")}
    assert sorted(device) == ["critical", "sheddable"]
    assert all(v > 0 for v in device.values())
