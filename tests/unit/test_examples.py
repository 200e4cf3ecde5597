"""Every example repo compiles, through the same settings path the CLI uses."""

from __future__ import annotations

from pathlib import Path

import pytest

from featurestore.config import load_settings
from featurestore.plan import compile_repo

ROOT = Path(__file__).resolve().parents[2]
REPOS = [ROOT / "examples" / "fraud", ROOT / "examples" / "precomputed", ROOT / "tenx" / "templates" / "repo"]


@pytest.mark.parametrize("repo", REPOS, ids=lambda p: p.name)
def test_example_compiles(repo: Path, tmp_path: Path) -> None:
    config = repo / "tenx.yaml"
    if "{project}" in config.read_text():  # the init template is filled in by `tenx init`
        filled = tmp_path / "tenx.yaml"
        filled.write_text(config.read_text().replace("{project}", "demo"))
        settings = load_settings(filled, environ={})
        settings = type(settings)(**{**settings.__dict__, "features_path": repo})
    else:
        settings = load_settings(config, environ={})
    plan = compile_repo(settings.features_path, project=settings.project, modules=settings.modules)
    assert plan.views
    assert all(view.features for view in plan.views)


def test_fraud_repo_views() -> None:
    plan = compile_repo(ROOT / "examples" / "fraud", project="fraud")
    assert [v.name for v in plan.views] == ["card_velocity", "merchant_risk"]
    velocity = plan.view("card_velocity")
    assert velocity.feature_names == ("count_10m", "count_1h", "small_charges_10m", "max_log_amount_1h")
    assert velocity.transform.constants == (("SMALL_AMOUNT", "2.0"),)
    assert velocity.transform.imports == (("np", "numpy", None),)
