"""The Plan: JSON round trip, content-hash versions, the registry and plan diffs."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from featurestore.errors import RegistryError
from featurestore.plan import ChangeKind, Plan, compile_repo, diff_plans, load_code
from featurestore.registry import FileRegistry

ROOT = Path(__file__).resolve().parents[3]
TEMPLATE = ROOT / "tenx" / "templates" / "repo"


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    target = tmp_path / "repo"
    shutil.copytree(TEMPLATE, target)
    return target


def compile_template(repo: Path) -> Plan:
    return compile_repo(repo, project="demo", modules=["features"])


def test_plan_round_trips_through_json(repo: Path) -> None:
    plan = compile_template(repo)
    again = Plan.from_json(plan.to_json())
    assert again == plan
    assert again.version == plan.version
    assert again.to_json() == plan.to_json()


def test_edited_plan_file_is_detected(repo: Path) -> None:
    data = json.loads(compile_template(repo).to_json())
    data["views"][0]["features"][0]["window"]["length"] += 1
    with pytest.raises(ValueError, match="does not match its recorded version"):
        Plan.from_dict(data)


HASH_SCRIPT = """
import sys
from pathlib import Path
from featurestore.plan import compile_repo
print(compile_repo(Path(sys.argv[1]), project="demo", modules=["features"]).version)
"""


def test_version_is_stable_across_processes_and_hash_seeds(repo: Path) -> None:
    versions = set()
    for seed in ("0", "1", "12345"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        result = subprocess.run(
            [sys.executable, "-c", HASH_SCRIPT, str(repo)],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        )
        versions.add(result.stdout.strip())
    assert versions == {compile_template(repo).version}


def test_a_set_constant_hashes_the_same_under_any_seed(tmp_path: Path) -> None:
    (tmp_path / "features.py").write_text(
        "from featurestore import Count, Entity, Source, feature_view\n"
        "from schemas import TRANSACTIONS\n"
        "HOME = {'FR', 'DE', 'ES', 'IT', 'PT', 'BE', 'NL'}\n"
        "user = Entity('user', key='user_id')\n"
        "tx = Source('tx', TRANSACTIONS)\n"
        "@feature_view(entity=user, source=tx, aggregations=[Count(windows=['1h'])],\n"
        "              where=lambda t: ~t['country'].isin(HOME))\n"
        "def abroad(t):\n"
        "    return t[[]]\n"
    )
    versions = {
        subprocess.run(
            [
                sys.executable,
                "-c",
                HASH_SCRIPT.replace('modules=["features"]', "modules=None"),
                str(tmp_path),
            ],
            env={**os.environ, "PYTHONHASHSEED": seed},
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        for seed in ("1", "2", "3")
    }
    assert len(versions) == 1


def _edit(repo: Path, old: str, new: str) -> None:
    path = repo / "features.py"
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new))


def test_changing_transform_source_changes_the_view_and_plan_versions(repo: Path) -> None:
    before = compile_template(repo)
    _edit(repo, 'tx["country"] != "FR"', 'tx["country"] != "DE"')
    after = compile_template(repo)
    assert after.version != before.version
    assert after.view("user_spend").version != before.view("user_spend").version
    assert after.view("merchant_sales").version == before.view("merchant_sales").version


def test_changing_a_captured_constant_changes_the_version(repo: Path) -> None:
    before = compile_template(repo)
    _edit(repo, '"USD": 0.92', '"USD": 0.93')
    assert compile_template(repo).view("user_spend").version != before.view("user_spend").version


def test_a_module_global_named_like_an_attribute_is_not_part_of_the_view(repo: Path) -> None:
    # user_spend calls `.fillna(...)` and `.where(...)`: module globals of those names are
    # not what it uses (a constant changed its version; a function refused the view).
    before = compile_template(repo)
    _edit(repo, "transactions = Source(", "fillna = 3600\n\n\ndef where(x):\n    return x\n\n\ntransactions = Source(")
    after = compile_template(repo)
    assert after.view("user_spend").version == before.view("user_spend").version
    _edit(repo, "fillna = 3600", "fillna = 7200")
    assert compile_template(repo).view("user_spend").version == before.view("user_spend").version


def test_comments_docstrings_and_line_moves_do_not_change_versions(repo: Path) -> None:
    before = compile_template(repo)
    _edit(repo, '    """Spend per card holder', '    # a comment\n    """Per-holder spend')
    path = repo / "features.py"
    path.write_text("\n\n" + path.read_text())
    after = compile_template(repo)
    assert after.view("user_spend").version == before.view("user_spend").version
    assert after.view("user_spend").location != before.view("user_spend").location


def test_metadata_changes_keep_the_view_version_but_change_the_plan(repo: Path) -> None:
    before = compile_template(repo)
    _edit(repo, 'ttl="2d"', 'ttl="3d"')
    after = compile_template(repo)
    assert after.view("user_spend").version == before.view("user_spend").version
    assert after.version != before.version


def test_shipped_code_runs_without_the_user_module(repo: Path) -> None:
    import pandas as pd

    plan = compile_template(repo)
    transform = load_code(plan.view("user_spend").transform)
    frame = pd.DataFrame({"amount": [10.0, 20.0], "currency": ["USD", "EUR"], "country": ["US", "FR"]})
    out = transform(frame)
    assert out["amount_eur"].tolist() == pytest.approx([9.2, 20.0])
    assert out["foreign_eur"].tolist() == pytest.approx([9.2, 0.0])
    where = load_code(plan.view("merchant_sales").where)  # type: ignore[arg-type]
    assert where(pd.DataFrame({"amount": [-1.0, 2.0]})).tolist() == [False, True]


# -- registry ------------------------------------------------------------------------------


def test_registry_keeps_every_applied_version(repo: Path, tmp_path: Path) -> None:
    registry = FileRegistry(tmp_path / "registry")
    assert registry.current() is None
    first = compile_template(repo)
    registry.apply(first)
    _edit(repo, 'ttl="2d"', 'ttl="3d"')
    second = compile_template(repo)
    record = registry.apply(second)
    assert record.previous == first.version
    assert registry.current() == second
    assert registry.get(first.version) == first
    assert sorted(registry.versions()) == sorted([first.version, second.version])
    assert [r.version for r in registry.history()] == [first.version, second.version]


def test_an_apply_refuses_when_another_apply_got_in_since_its_diff(repo: Path, tmp_path: Path) -> None:
    # Two people compile from the same applied plan; the second to apply must see the
    # first one's plan in a diff, not silently replace it.
    registry = FileRegistry(tmp_path / "registry")
    base = compile_template(repo)
    registry.apply(base, expected=None)
    _edit(repo, 'ttl="2d"', 'ttl="3d"')
    theirs = compile_template(repo)
    _edit(repo, 'ttl="3d"', 'ttl="4d"')
    mine = compile_template(repo)
    registry.apply(theirs, expected=base.version)
    with pytest.raises(RegistryError, match=f"changed while this one was compiled \\({base.version} -> "):
        registry.apply(mine, expected=base.version)
    assert registry.current() == theirs
    record = registry.apply(mine, expected=theirs.version)
    assert record.previous == theirs.version
    assert [r.version for r in registry.history()] == [base.version, theirs.version, mine.version]


def test_a_plan_file_under_another_plans_name_is_refused(repo: Path, tmp_path: Path) -> None:
    # The registry is code every engine runs: a plan swapped in under the applied
    # version's name (its own recorded version consistent with its content) is refused.
    registry = FileRegistry(tmp_path / "registry")
    first = compile_template(repo)
    registry.apply(first)
    _edit(repo, 'ttl="2d"', 'ttl="3d"')
    other = compile_template(repo)
    (tmp_path / "registry" / "plans" / f"{first.version}.json").write_text(other.to_json())
    with pytest.raises(RegistryError) as refused:
        registry.current()
    assert str(refused.value).startswith(
        f"plan file {tmp_path / 'registry' / 'plans' / (first.version + '.json')} holds plan {other.version}, "
        f"not {first.version} (its content hash does not match its name): refusing to run it"
    )


def test_registry_names_missing_versions(tmp_path: Path) -> None:
    registry = FileRegistry(tmp_path)
    with pytest.raises(RegistryError, match=r"plan version abc is not in the registry at .*; known: none"):
        registry.get("abc")


def test_a_registry_path_that_is_a_file_is_refused(tmp_path: Path) -> None:
    # Before: `plan` said "nothing applied yet" and `apply` died with NotADirectoryError.
    file = tmp_path / "registry"
    file.write_text("")
    with pytest.raises(RegistryError) as raised:
        FileRegistry(file)
    assert str(raised.value) == (
        f"registry path {file} is a file; it must be a folder: point `registry:` in tenx.yaml "
        "(or TENX_REGISTRY) at a folder, or move the file away"
    )
    with pytest.raises(RegistryError) as raised:
        FileRegistry(file / "plans")
    assert str(raised.value).startswith(f"registry path {file / 'plans'} is inside {file}, which is a file; ")


# -- diff ----------------------------------------------------------------------------------


def test_diff_marks_breaking_changes_to_online_features(repo: Path) -> None:
    before = compile_template(repo)
    _edit(repo, '        Min("amount_eur", windows=["7d"]),\n', "")
    _edit(repo, 'ttl="1d"', 'ttl="12h"')
    after = compile_template(repo)
    changes = diff_plans(before, after)
    rendered = [str(c) for c in changes]
    new_version = after.view("user_spend").version
    old_version = before.view("user_spend").version
    assert rendered == [
        "~ feature view `merchant_sales`: ttl 86400000000 -> 43200000000 (microseconds)",
        "- feature view `user_spend`: feature `min_amount_eur_7d`  BREAKING",
        f"~ feature view `user_spend`: version {old_version} -> {new_version}: backfill and materialize "
        "before serving  BREAKING",
    ]
    assert [c.kind for c in changes] == [ChangeKind.CHANGED, ChangeKind.REMOVED, ChangeKind.CHANGED]


def test_diff_from_nothing_adds_every_view(repo: Path) -> None:
    plan = compile_template(repo)
    changes = diff_plans(None, plan)
    assert [c.kind for c in changes] == [ChangeKind.ADDED, ChangeKind.ADDED]
    assert not any(c.breaking for c in changes)


def test_a_renamed_project_is_a_breaking_change(repo: Path) -> None:
    # Online keys are tenx:<project>:...: after the rename, serving finds nothing until materialize.
    before = compile_template(repo)
    after = compile_repo(repo, project="demo2", modules=["features"])
    assert [str(c) for c in diff_plans(before, after)] == [
        "~ project: demo -> demo2: online keys change; re-run tenx materialize  BREAKING"
    ]
    offline_only = dataclasses.replace(
        after, views=tuple(dataclasses.replace(view, online=False) for view in after.views)
    )
    project_change = diff_plans(dataclasses.replace(offline_only, project="demo"), offline_only)
    assert [(c.subject, c.breaking) for c in project_change] == [("project", False)]


def test_entities_and_sources_no_view_uses_still_show_in_the_diff(repo: Path) -> None:
    before = compile_template(repo)
    _edit(repo, "transactions = Source(", 'store = Entity("store", key="merchant_id")\ntransactions = Source(')
    after = compile_template(repo)
    assert after.version != before.version
    assert [str(c) for c in diff_plans(before, after)] == ["+ entity `store`: added"]
    assert [str(c) for c in diff_plans(after, before)] == ["- entity `store`: removed"]
    described = dataclasses.replace(
        before, sources=tuple(dataclasses.replace(s, description="Card payments.") for s in before.sources)
    )
    assert [str(c) for c in diff_plans(before, described)] == ["~ source `transactions`: definition"]
    # A field added: an events table keeps its fields, which the diff says with what to do.
    from schemas import Field

    grown = dataclasses.replace(
        before,
        sources=tuple(
            dataclasses.replace(
                s, schema=dataclasses.replace(s.schema, fields=(*s.schema.fields, Field("x", "int64", nullable=True)))
            )
            for s in before.sources
        ),
    )
    redescribed = dataclasses.replace(
        before,
        sources=tuple(
            dataclasses.replace(
                s,
                schema=dataclasses.replace(
                    s.schema, fields=tuple(dataclasses.replace(f, description="edited") for f in s.schema.fields)
                ),
            )
            for s in before.sources
        ),
    )
    assert [str(c) for c in diff_plans(before, redescribed)] == ["~ source `transactions`: definition"]
    assert [str(c) for c in diff_plans(before, grown)] == [
        "~ source `transactions`: definition: its fields changed; an events table `transactions` ingested already "
        "keeps the fields it was made with (ingest and backfill refuse it then): give the source a new table "
        '(table="transactions_v2"), `tenx ingest` its events there and `tenx backfill` its views'
    ]
    # Repointed at another table: its views keep their versions (and their old values),
    # which the diff must say, with what to run.
    moved = dataclasses.replace(before, sources=tuple(dataclasses.replace(s, table="tx_v2") for s in before.sources))
    assert [str(c) for c in diff_plans(before, moved)] == [
        "~ source `transactions`: definition: now reads table `tx_v2` (was `transactions`); its views keep their "
        "versions and the values computed from the old events: `tenx ingest` the new table's events and "
        "`tenx backfill` the views over their whole history, then `tenx materialize`"
    ]


def test_turning_offline_storage_off_shows_in_the_diff(repo: Path) -> None:
    before = compile_template(repo)
    _edit(repo, 'ttl="1d",', 'ttl="1d",\n    offline=False,')
    after = compile_template(repo)
    assert after.version != before.version
    assert [str(c) for c in diff_plans(before, after)] == ["~ feature view `merchant_sales`: offline True -> False"]


def test_an_entity_description_edit_breaks_no_view(repo: Path) -> None:
    """It marked every view of the entity `entity  BREAKING`, though no version changed."""
    before = compile_template(repo)
    _edit(repo, 'description="A card holder."', 'description="A card holder, by id."')
    after = compile_template(repo)
    assert [v.version for v in after.views] == [v.version for v in before.views]
    rendered = [str(c) for c in diff_plans(before, after)]
    assert not any("BREAKING" in line for line in rendered), rendered
    assert rendered == ["~ entity `user`: definition"]
