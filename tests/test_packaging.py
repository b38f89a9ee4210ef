"""The package as its ecosystem expects it: `fmnist --version`, `python -m fmnist`, every import declared."""

import ast
import subprocess
import sys
from importlib.metadata import packages_distributions, version

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

import fmnist
from conftest import REPO, pyproject


def test_version_names_fmnist_ray_and_torch_and_python_m_fmnist_is_the_command():
    done = subprocess.run([sys.executable, "-m", "fmnist", "--version"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"fmnist {fmnist.__version__} (Ray {version('ray')}, torch {version('torch')}, ")
    assert fmnist.__version__ == pyproject()["project"]["version"]

    done = subprocess.run([sys.executable, "-m", "fmnist", "evaluate", "/nowhere"], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 2 and done.stderr.startswith("error: predictions directory /nowhere does not exist")


def imported_distributions(*folders: str) -> dict[str, set[str]]:
    """The distributions that the Python files under ``folders`` import (not the standard library's,
    not the project's own modules): distribution -> the files importing it."""
    local = {p.stem for folder in ("fmnist", "tests", "workflows", "bench") for p in (REPO / folder).glob("*.py")}
    provided_by = packages_distributions()
    found: dict[str, set[str]] = {}
    for folder in folders:
        for path in (REPO / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Import):
                    names = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0:
                    names = [node.module]
                else:
                    continue
                for top in {name.split(".")[0] for name in names} - set(sys.stdlib_module_names) - local - {"fmnist"}:
                    for distribution in provided_by.get(top, [top]):
                        found.setdefault(canonicalize_name(distribution), set()).add(path.name)
    return found


def declared(requirements: list[str]) -> set[str]:
    names = set()
    for text in requirements:
        requirement = Requirement(text)
        if requirement.name == "fmnist":  # the dev extra reuses the others
            names |= {n for extra in requirement.extras for n in declared(extras()[extra])}
        names.add(canonicalize_name(requirement.name))
    return names


def extras() -> dict[str, list[str]]:
    return pyproject()["project"]["optional-dependencies"]


def test_every_package_the_code_imports_is_declared():
    dependencies = declared(pyproject()["project"]["dependencies"])
    runtime = dependencies | {n for name, extra in extras().items() if name != "dev" for n in declared(extra)}
    missing = {d: files for d, files in imported_distributions("fmnist", "workflows").items() if d not in runtime}
    assert not missing, f"imported but not declared in pyproject.toml: {missing}"
    missing = {d: files for d, files in imported_distributions("tests").items()
               if d not in dependencies | declared(extras()["dev"])}
    assert not missing, f"imported by the tests but not in the dev extra: {missing}"


def test_the_dev_extra_holds_every_other_extra():
    dev = [Requirement(r) for r in extras()["dev"]]
    assert {e for r in dev if r.name == "fmnist" for e in r.extras} == set(extras()) - {"dev"}
