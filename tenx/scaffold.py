"""`tenx init`: scaffold a feature repo from the bundled template."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from featurestore.config import check_project_name
from featurestore.errors import ConfigError


def init_repo(target: Path, *, project: str | None = None) -> list[Path]:
    """Create `target` with tenx.yaml, features.py and README.md; returns the files.

    Refuses to overwrite an existing tenx.yaml so an existing repo is never clobbered.
    """
    name = project or target.name
    check_project_name(name)
    if (target / "tenx.yaml").exists():
        raise ConfigError(f"{target / 'tenx.yaml'} already exists; choose another folder")
    target.mkdir(parents=True, exist_ok=True)
    template = resources.files("tenx") / "templates" / "repo"
    written: list[Path] = []
    for filename in ("tenx.yaml", "features.py", "README.md"):
        text = (template / filename).read_text()
        if filename != "features.py":
            text = text.replace("{project}", name)
        path = target / filename
        path.write_text(text)
        written.append(path)
    return written
