"""The setup is consistent: environment.yml = pyproject.toml, and CI runs the README's test command.

No conda channel can be reached where this course is built, so `environment.yml` cannot be solved
here; this test is the proof that it asks for exactly what `pyproject.toml` (the one source of truth) does.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]


def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def requirements(lines: list[str]) -> dict[str, str]:
    """{canonical package name: version specifier} for a list of requirement strings."""
    reqs = [Requirement(line) for line in lines]
    return {canonicalize_name(r.name): str(r.specifier) for r in reqs}


def pip_metadata_requirements() -> dict[str, str]:
    project = pyproject()["project"]
    lines = list(project["dependencies"])
    for extra in project["optional-dependencies"].values():
        lines += extra
    return requirements(lines)


def environment_yml() -> dict:
    return yaml.safe_load((ROOT / "environment.yml").read_text())


def environment_pip_block(env: dict) -> list[str]:
    blocks = [d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d]
    assert len(blocks) == 1, "environment.yml should have exactly one pip: block"
    return blocks[0]


def differences(pip: dict[str, str], conda: dict[str, str]) -> list[str]:
    """Human-readable differences between two {name: specifier} maps; empty when they agree."""
    out = [f"{n}{pip[n]} is in pyproject.toml but not in environment.yml" for n in sorted(pip.keys() - conda.keys())]
    out += [f"{n}{conda[n]} is in environment.yml but not in pyproject.toml" for n in sorted(conda.keys() - pip.keys())]
    out += [
        f"{n}: pyproject.toml asks for {pip[n]!r}, environment.yml for {conda[n]!r}"
        for n in sorted(pip.keys() & conda.keys())
        if pip[n] != conda[n]
    ]
    return out


def test_environment_yml_lists_the_same_packages_as_pyproject():
    block = environment_pip_block(environment_yml())
    assert "-e ." in block, "environment.yml should install minivlm itself (`-e .` in its pip block)"
    conda = requirements([line for line in block if not line.startswith("-")])
    assert differences(pip_metadata_requirements(), conda) == []


def test_the_comparison_catches_a_disagreement():
    pip = pip_metadata_requirements()
    drifted = {**pip, "torch": "==2.13.0"}
    del drifted["einops"]
    assert differences(pip, drifted) == [
        "einops==0.8.2 is in pyproject.toml but not in environment.yml",
        "torch: pyproject.toml asks for '==2.14.1', environment.yml for '==2.13.0'",
    ]


def test_every_dependency_is_pinned_and_torchvision_matches_torch():
    pins = pip_metadata_requirements()
    assert all(spec.startswith("==") for spec in pins.values()), pins
    # torchvision 0.N is built for torch 2.(N - 15): 0.29 <-> 2.14. A mismatch fails at import time.
    torch_minor = int(pins["torch"].removeprefix("==").split(".")[1])
    vision_minor = int(pins["torchvision"].removeprefix("==").split(".")[1])
    assert vision_minor - 15 == torch_minor


def test_environment_python_satisfies_requires_python():
    requires = SpecifierSet(pyproject()["project"]["requires-python"])
    pythons = [d for d in environment_yml()["dependencies"] if isinstance(d, str) and d.startswith("python")]
    assert len(pythons) == 1
    assert pythons[0].split("=")[-1] + ".0" in requires


def readme_commands() -> list[str]:
    """The shell commands of the README's first code block: its quick start."""
    block = re.search(r"```(?:bash|sh|console)?\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    assert block, "the README should open with a code block holding its two commands"
    return [line.split("#")[0].strip() for line in block.group(1).splitlines() if line.split("#")[0].strip()]


def test_readme_opens_with_exactly_two_commands_demo_then_test():
    assert readme_commands() == ["python3 run.py demo", "python3 run.py test"]


def test_ci_runs_exactly_the_readme_test_command():
    ci = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    commands = [line for line in ci if line and not line.startswith("#") and not line.startswith(("set ", "cd "))]
    assert commands == [readme_commands()[1]]
