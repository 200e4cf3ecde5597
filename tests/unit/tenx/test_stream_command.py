"""`tenx stream --recovery-dir`: a directory resumes only the job it was made for."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from featurestore.errors import ConfigError
from tenx.commands.stream import RECOVERY_MANIFEST, bind_recovery_dir
from tests.unit.pipelines.test_kernel_parity import VIEWS, WINDOWED_ONLY


def test_a_recovery_dir_resumes_only_the_views_versions_and_shards_it_was_made_for(tmp_path: Path) -> None:
    """Resumed under a changed view it wrote the old definition's values under the new
    version's keys; under other shards, or with a view added or left out, the offsets
    resume past events some state never saw."""
    view, changed, other = VIEWS[0], VIEWS[1], replace(WINDOWED_ONLY, name="other")
    bind_recovery_dir(tmp_path, [view], 4)
    assert json.loads((tmp_path / RECOVERY_MANIFEST).read_text()) == {"views": {"view": view.version}, "shards": 4}
    bind_recovery_dir(tmp_path, [view], 4)  # the same job resumes
    for run, shards, problem in (
        ([changed], 4, f"it holds view `view` version {view.version}; the plan has {changed.version}"),
        ([view], 8, "its state is split over --shards 4, not 8"),
        ([view, other], 4, "it holds no state of view `other`"),
        ([], 4, "it holds view `view`, which this run leaves out"),
    ):
        with pytest.raises(ConfigError) as refused:
            bind_recovery_dir(tmp_path, run, shards)
        assert problem in str(refused.value)
        assert "start with a new --recovery-dir" in str(refused.value)
