"""The support window is a tested promise: every floor in pyproject.toml is pinned in CI's floor job."""

import re
import tomllib
from pathlib import Path

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


def test_the_package_data_globs_ship_every_config_and_data_file():
    """A non-editable install ships the configs that `lightning-peft fit --config NAME` reads, with their model
    folders and the data they name: every file under lightning_peft/configs and lightning_peft/data matches a
    package-data glob (setuptools expands them as glob(recursive=True) in the package folder)."""
    import glob

    package = REPO / "lightning_peft"
    patterns = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["lightning_peft"]
    shipped = {Path(f) for pattern in patterns for f in glob.glob(pattern, root_dir=package, recursive=True)}
    files = {p.relative_to(package) for folder in ("configs", "data") for p in (package / folder).rglob("*")
             if p.is_file() and "__pycache__" not in p.parts}
    assert {Path("configs/quickstart.yaml"), Path("configs/tiny_llama/config.json"), Path("data/sst2_dev.tsv")} <= files
    assert files <= shipped, f"not shipped by tool.setuptools.package-data: {sorted(map(str, files - shipped))}"


def test_the_repository_configs_folder_is_the_packages():
    """`configs/quickstart.yaml` keeps working in a clone: a symlink to lightning_peft/configs, not a copy."""
    assert (REPO / "configs").is_symlink()
    assert (REPO / "configs").resolve() == (REPO / "lightning_peft" / "configs").resolve()
