"""`tenx init`: scaffold a feature repo from the bundled template."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from featurestore.config import check_project_name
from featurestore.errors import ConfigError


def init_repo(target: Path, *, project: str | None = None) -> list[Path]:
    """Create `target` with tenx.yaml, features.py and README.md; returns the files.

    Refuses when any of the three exists already, so nothing of the user's is ever
    overwritten (a folder with its own features.py and no tenx.yaml lost it).
    """
    name = project or target.resolve().name
    check_project_name(name)
    files = ("tenx.yaml", "features.py", "README.md")
    existing = [target / filename for filename in files if (target / filename).exists()]
    if existing:
        raise ConfigError(
            f"{', '.join(str(path) for path in existing)} already exist{'s' if len(existing) == 1 else ''}; "
            "tenx init never overwrites a file: choose another (or a new) folder"
        )
    try:
        target.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ConfigError(f"cannot create the folder {target}: {error.strerror or error}") from None
    template = resources.files("tenx") / "templates" / "repo"
    written: list[Path] = []
    for filename in files:
        text = (template / filename).read_text()
        if filename != "features.py":
            text = text.replace("{project}", name)
        path = target / filename
        with path.open("x") as out:  # exclusive: a file made meanwhile is not overwritten either
            out.write(text)
        written.append(path)
    return written
