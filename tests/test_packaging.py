"""The support window is a tested promise: every floor in pyproject.toml is pinned in CI's floor job."""

import re
import tomllib

from tests.conftest import REPO


def _floors() -> dict[str, str]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    specs = list(project["dependencies"]) + [d for extra in project["optional-dependencies"].values() for d in extra]
    floors = {}
    for spec in specs:
        m = re.fullmatch(r"([A-Za-z0-9_.-]+)(?:\[[^\]]*\])?\s*>=\s*([0-9][0-9A-Za-z.]*)", spec.strip())
        if m:
            floors[m.group(1).lower()] = m.group(2)
    return floors


def _pins() -> dict[str, str]:
    pins = {}
    for line in (REPO / ".ci" / "floors.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, version = line.split("==")
            pins[name.strip().lower()] = version.strip()
    return pins


def _same(floor: str, pin: str) -> bool:
    pad = lambda v: [int(x) for x in v.split(".")] + [0] * (3 - len(v.split(".")))  # noqa: E731
    return pad(floor) == pad(pin)


def test_every_declared_floor_is_pinned_in_the_floor_job():
    floors, pins = _floors(), _pins()
    assert floors, "no floors parsed from pyproject.toml"
    missing = sorted(set(floors) - set(pins))
    assert not missing, f"floors declared in pyproject.toml but not tested by .ci/floors.txt: {missing}"
    differ = {n: (floors[n], pins[n]) for n in floors if not _same(floors[n], pins[n])}
    assert not differ, f"pyproject floor vs .ci/floors.txt pin (must be equal): {differ}"



def test_the_package_version_is_the_one_pyproject_declares():
    import lightning_peft

    assert lightning_peft.__version__ == tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
