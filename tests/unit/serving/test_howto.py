"""The Python client example of docs/howto.md runs as written, in a feature repo with a
materialized view, and finds the values."""

from __future__ import annotations

import ast
import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest

from featurestore import Count, Entity, Source, feature_view
from featurestore.config import ENVIRONMENT, load_settings
from featurestore.plan import AS_OF, compile_definitions
from featurestore.registry import FileRegistry
from featurestore.stores.online import open_online_store
from schemas import TRANSACTIONS

HOWTO = Path(__file__).resolve().parents[3] / "docs" / "howto.md"


@feature_view(
    entity=Entity("user", key="user_id", dtype="int64"),
    source=Source("transactions", TRANSACTIONS),
    aggregations=[Count()],
    windows=["1h"],
)
def user_spend(tx: Any) -> Any:
    return tx[[]]


def client_example() -> str:
    section = HOWTO.read_text().split("## Serve features", 1)[1].split("\n## ", 1)[0]
    blocks = [b for b in re.findall(r"```python\n(.*?)```", section, flags=re.DOTALL) if "FeatureClient" in b]
    assert len(blocks) == 1, "docs/howto.md, Serve features: expected one Python block using FeatureClient"
    return str(blocks[0])


def test_howto_client_example_finds_materialized_values(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for variable in ENVIRONMENT:
        monkeypatch.delenv(variable, raising=False)
    (tmp_path / "tenx.yaml").write_text("project: demo\n")
    monkeypatch.chdir(tmp_path)
    settings = load_settings()
    plan = compile_definitions("demo", views=[user_spend])
    FileRegistry(settings.registry_dir).apply(plan)  # what `tenx apply` records
    view = plan.view("user_spend")
    store = open_online_store(redis_url=None, sqlite_path=settings.online_path, project=settings.project)
    now = datetime.now(UTC)
    rows = {"user_id": [1, 2], AS_OF: [now, now], "count_1h": [4, 9]}
    store.write(view, pa.table(rows, schema=view.changelog_schema()))
    store.close()

    module = ast.parse(client_example())
    last = module.body.pop()
    assert isinstance(last, ast.Expr), "the example ends with the lookup whose value it shows"
    namespace: dict[str, Any] = {}
    exec(compile(module, str(HOWTO), "exec"), namespace)
    frame = eval(compile(ast.Expression(last.value), str(HOWTO), "eval"), namespace)
    namespace["client"].close()
    assert frame[["user_id", "status", "count_1h"]].to_dict("records") == [
        {"user_id": 1, "status": "found", "count_1h": 4},
        {"user_id": 2, "status": "found", "count_1h": 9},
    ]
