"""The package by stage: each stage imports core and never a sibling, except where the workflow
chains them; and `fmnist evaluate`, reports from Parquet, runs without Ray."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import numpy as np

from fmnist.core.data import load_test_split

from conftest import IMPORTS_SHOWN, REPO, local_env
from test_mistakes import write_scored

STAGES = {"train", "score", "evaluate", "tune", "serve"}
# What each part may import of fmnist besides itself and core. A search's trials are training runs;
# the pipeline chains train -> score -> evaluate; the command line and the package's top sit above all.
MAY_IMPORT = {
    "core": set(),
    "train": set(),
    "score": set(),
    "evaluate": set(),
    "serve": set(),
    "tune": {"train"},
    "pipeline": {"train", "score", "evaluate"},
    "cli": STAGES | {"pipeline"},
    "__init__": set(),
    "__main__": {"cli"},
}


def _part(module: str) -> str:
    """fmnist.train.loop -> train; fmnist.cli -> cli; fmnist -> __init__."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _fmnist_imports(file: Path) -> set[str]:
    """The fmnist modules ``file`` imports, at its top or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(file.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "fmnist":
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "fmnist"}
    return found


def test_each_stage_imports_core_and_never_a_sibling_stage():
    package = REPO / "fmnist"
    wrong = []
    for file in sorted(package.rglob("*.py")):
        relative = file.relative_to(package).with_suffix("")
        part = relative.parts[0]
        assert part in MAY_IMPORT, f"{relative}: a module outside the stages; name where it belongs in MAY_IMPORT"
        allowed = {part, "core"} | MAY_IMPORT[part]
        for module in _fmnist_imports(file):
            # `from fmnist import CLASS_NAMES`: core's names, re-exported at the top, for any stage.
            if _part(module) not in allowed and not (module == "fmnist" and part != "core"):
                wrong.append(f"fmnist/{relative}.py imports {module}")
    assert wrong == []


def test_core_imports_nothing_above_it():
    # The top of the package re-exports core's names: core importing it would be a cycle.
    wrong = [f"{file.name}: {module}" for file in (REPO / "fmnist" / "core").glob("*.py")
             for module in _fmnist_imports(file) if _part(module) != "core"]
    assert wrong == []


def test_evaluate_with_every_report_never_imports_ray(real_data_dir, tmp_path):
    labels = load_test_split(real_data_dir)[1][:200]  # --mistakes shows the test images by id
    predicted = np.where(np.arange(200) % 4 == 0, (labels + 1) % 10, labels)
    predictions = write_scored(tmp_path / "predictions", np.arange(200), labels, predicted)
    done = subprocess.run(
        [sys.executable, "-c", IMPORTS_SHOWN, "evaluate", str(predictions), "--data-dir", str(real_data_dir),
         "--json", str(tmp_path / "report.json"), "--plot", str(tmp_path / "cm.png"),
         "--mistakes", str(tmp_path / "mistakes.png")],
        env=local_env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "imported: []" in done.stdout
    assert (tmp_path / "mistakes.png").stat().st_size > 0
