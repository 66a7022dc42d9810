"""The README's Guarantees name real tests: every `file.py::test_name` it cites exists."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_test_the_readme_cites_exists() -> None:
    readme = (ROOT / "README.md").read_text()
    cited: list[tuple[str, str]] = []
    current = ""
    for path, name in re.findall(r"`(?:([\w/]+\.py))?::(test_\w+)`", readme):
        current = path or current  # `a.py::test_x`, `::test_y` (same file as the last one)
        cited.append((current, name))
    assert len(cited) >= 15
    missing = [
        f"{path}::{name}"
        for path, name in cited
        if not re.search(rf"^(async )?def {name}\(", (ROOT / "tests" / path).read_text(), re.M)
    ]
    assert missing == []
