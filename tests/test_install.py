"""The package installs beside any torch: pyproject.toml declares ranges, and the exact builds
this machine uses live in constraints.txt, which only the Makefile's set-up applies."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
from packaging.requirements import Requirement

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

ROOT = Path(__file__).resolve().parents[1]
PINNED_HERE = ("torch", "torchvision")  # what a cluster's CUDA build must not be replaced by


def requirements(lines) -> dict[str, Requirement]:
    reqs = (Requirement(line.split("#")[0].strip()) for line in lines
            if line.split("#")[0].strip())
    return {req.name.lower(): req for req in reqs}


def constraints() -> dict[str, Requirement]:
    return requirements((ROOT / "constraints.txt").read_text().splitlines())


def test_pyproject_declares_ranges_never_one_version():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    deps = requirements(project["dependencies"])
    extras = [requirements(group) for group in project.get("optional-dependencies", {}).values()]
    for name, req in [*deps.items(), *(item for group in extras for item in group.items())]:
        exact = [s for s in req.specifier if s.operator in ("==", "===")]
        assert not exact, f"pyproject.toml pins {name} to one version ({req}): declare a range " \
                          "and put the exact build in constraints.txt"
    pinned = constraints()
    for name in PINNED_HERE:
        assert name in deps, f"{name} is a dependency"
        version = next(iter(pinned[name].specifier)).version
        # the range admits this machine's build and a newer one (a cluster's CUDA torch)
        assert deps[name].specifier.contains(version), (name, str(deps[name].specifier))
        newer = re.sub(r"^(\d+)\.(\d+).*", lambda m: f"{m[1]}.{int(m[2]) + 1}.0", version)
        assert deps[name].specifier.contains(newer), (name, newer, str(deps[name].specifier))


def test_constraints_pin_this_machines_builds():
    pinned = constraints()
    for name in PINNED_HERE:
        assert name in pinned, f"constraints.txt pins {name}"
        assert [s.operator for s in pinned[name].specifier] == ["=="], str(pinned[name])


def test_make_setup_installs_with_the_constraints_file():
    makefile = (ROOT / "Makefile").read_text()
    rule = re.search(r"^\.cnexp-setup:(.*)\n((?:\t.*\n)+)", makefile, re.M)
    assert rule, "the Makefile has a .cnexp-setup rule"
    prerequisites, recipe = rule[1].split(), rule[2]
    assert "constraints.txt" in prerequisites  # a changed pin re-runs the set-up
    install = next(line for line in recipe.splitlines() if "pip install" in line)
    assert re.search(r"(-c|--constraint)\s+constraints\.txt", install), install
