"""The code map (README's "Code map" table, ``dispatcher/__init__.py``'s docstring) matches the folders, and
no module grows past 400 lines (issue 13: a map that drifts from the tree misleads more than none)."""

from __future__ import annotations

import re
from pathlib import Path

import dispatcher

ROOT = Path(__file__).resolve().parents[2]
MAX_LINES = 400


def rooms() -> set[str]:
    """The dispatcher's sub-packages, one level down."""
    return {p.parent.name for p in (ROOT / "dispatcher").glob("*/__init__.py")}


def readme_rows() -> dict[str, str]:
    """``dispatcher/<room>/`` -> the text of its row in the README's code map."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index("### Code map") :]
    return {m.group(1): m.group(2) for m in re.finditer(r"^\| `dispatcher/(\w+)/` \|(.*)\|$", section, re.M)}


def test_every_room_is_in_the_readme_map_and_every_row_is_a_room():
    assert rooms() == set(readme_rows()), "README's code map and dispatcher/ disagree"
    assert {"http", "loop", "queues", "gpus", "db", "cli"} <= rooms()


def test_modules_the_readme_map_names_exist():
    for room, row in readme_rows().items():
        for name in re.findall(r"`(\w+\.py)`", row):
            found = (ROOT / "dispatcher" / room / name).is_file()
            assert found, f"README's code map names dispatcher/{room}/{name}, which does not exist"


def test_the_package_docstring_names_every_room():
    doc = dispatcher.__doc__ or ""
    missing = [room for room in rooms() if f"``{room}/``" not in doc]
    assert not missing, f"dispatcher/__init__.py's map lacks {missing}"


def test_no_module_is_over_400_lines():
    sources = [p for d in ("dispatcher", "producer", "simgpu") for p in (ROOT / d).rglob("*.py")]
    assert len(sources) > 50, "the glob found too few modules: wrong root?"
    long = {
        str(p.relative_to(ROOT)): n for p in sources if (n := len(p.read_text().splitlines())) > MAX_LINES
    }
    assert not long, f"split these along a real seam: {long}"


def test_the_two_event_modules_have_different_names():
    # producer/events.py (the Lambda's event shapes) and the dispatcher's task events were both events.py.
    names = {p.name for p in (ROOT / "dispatcher").rglob("*.py")}
    assert "events.py" not in names
