"""Evaluation of Parquet predictions: scikit-learn's figures, the report, JSON, PNG and exit codes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from rich.console import Console
from sklearn.metrics import accuracy_score, classification_report, confusion_matrix

from fmnist.cli import main
from fmnist.core.data import load_test_split
from fmnist.core.model import CLASS_NAMES
from fmnist.core.outputs import StagedOutput
from fmnist.core.run_layout import CHECKPOINT_METADATA_KEY
from fmnist.core.storage import StoragePath
from fmnist.evaluate.metrics import evaluate_predictions
from fmnist.evaluate.report import print_report

from conftest import REPO, one_error_line

CLASSES = list(range(len(CLASS_NAMES)))
CHECKPOINT = "runs/train-20250101-120000/checkpoint_000009"
# A real model's typical mix-ups, e.g. shirts taken for T-shirts and back.
CONFUSED_WITH = {6: 0, 0: 6, 2: 4, 4: 2, 3: 4, 7: 9, 9: 7, 5: 7}


def realistic_predictions(data_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    """The real test labels, with a deterministic ~12% of predictions wrong the way a model errs."""
    _, labels = load_test_split(data_dir)
    labels = labels.astype(np.int64)
    rng = np.random.default_rng(0)
    predictions = labels.copy()
    for i in np.flatnonzero(rng.random(len(labels)) < 0.12):
        # Mostly the typical mix-up; now and then any other class.
        other = (labels[i] + rng.integers(1, 10)) % 10
        predictions[i] = CONFUSED_WITH.get(int(labels[i]), other) if rng.random() < 0.8 else other
    return labels, predictions


def committed(directory: Path, files: dict[str, pa.Table | bytes]) -> Path:
    """``files`` (Parquet tables, or raw bytes) committed to ``directory`` as 'fmnist score' commits its output."""
    with StagedOutput(StoragePath.parse(str(directory))) as staged:
        for name, content in files.items():
            target = Path(staged.dir.path) / name
            if isinstance(content, bytes):
                target.write_bytes(content)
            else:
                pq.write_table(content, target)
        staged.commit(rows=sum(c.num_rows for c in files.values() if isinstance(c, pa.Table)), schema=[])
    return directory


def write_predictions(directory: Path, labels, predictions, files: int = 1, checkpoint: str | None = None) -> Path:
    """Predictions as 'fmnist score' writes them: every column, split over ``files`` files."""
    predictions = np.asarray(predictions, dtype=np.int64)
    n = len(predictions)
    probabilities = np.full((n, 10), 0.02, dtype=np.float32)
    probabilities[np.arange(n), predictions] = 0.82
    table = pa.table({
        "id": pa.array(np.arange(n), pa.int64()),
        "path": pa.nulls(n, pa.string()),
        "label": pa.array(labels, pa.int64()),
        "prediction": pa.array(predictions, pa.int64()),
        "predicted_class": pa.array([CLASS_NAMES[p] for p in predictions], pa.string()),
        "confidence": pa.array(probabilities.max(axis=1), pa.float32()),
        "probabilities": pa.array(list(probabilities), pa.list_(pa.float32())),
    })
    if checkpoint:
        table = table.replace_schema_metadata({CHECKPOINT_METADATA_KEY: checkpoint.encode()})
    parts = np.array_split(np.arange(n), files)
    return committed(directory, {f"part-{k:03d}.parquet": table.take(rows) for k, rows in enumerate(parts)})


def assert_matches_sklearn(figures: dict, labels, predictions) -> None:
    expected = classification_report(labels, predictions, labels=CLASSES, target_names=CLASS_NAMES,
                                     output_dict=True, zero_division=0)
    assert figures["n"] == len(labels)
    assert figures["accuracy"] == pytest.approx(accuracy_score(labels, predictions), abs=1e-12)
    assert [c["class"] for c in figures["per_class"]] == list(CLASS_NAMES)
    for ours in figures["per_class"]:
        theirs = expected[ours["class"]]
        assert (ours["precision"], ours["recall"], ours["f1"], ours["support"]) == pytest.approx(
            (theirs["precision"], theirs["recall"], theirs["f1-score"], theirs["support"]), abs=1e-12)
    for key, name in (("macro_avg", "macro avg"), ("weighted_avg", "weighted avg")):
        theirs = expected[name]
        assert figures[key] == pytest.approx({"precision": theirs["precision"], "recall": theirs["recall"],
                                              "f1": theirs["f1-score"], "support": theirs["support"]}, abs=1e-12)
    assert figures["confusion_matrix"] == confusion_matrix(labels, predictions, labels=CLASSES).tolist()


@pytest.fixture(scope="module")
def realistic(real_data_dir, tmp_path_factory) -> tuple[Path, np.ndarray, np.ndarray]:
    labels, predictions = realistic_predictions(real_data_dir)
    directory = write_predictions(tmp_path_factory.mktemp("predictions"), labels, predictions, files=3,
                                  checkpoint=CHECKPOINT)
    return directory, labels, predictions


def test_figures_match_sklearn_on_realistic_predictions(realistic):
    directory, labels, predictions = realistic
    evaluation = evaluate_predictions(directory)

    assert_matches_sklearn(evaluation.to_json(), labels, predictions)
    assert 0.85 < evaluation.accuracy < 0.91
    assert evaluation.checkpoint == CHECKPOINT
    top = evaluation.most_confused(1)[0]
    assert {CLASS_NAMES[top.a], CLASS_NAMES[top.b]} == {"T-shirt/top", "Shirt"}


@pytest.mark.parametrize("labels, predictions", [
    pytest.param([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 6, 6], [0, 1, 2, 3, 4, 5, 0, 7, 8, 9, 0, 2], id="class-never-predicted"),
    pytest.param([0, 1, 2, 3, 4, 5, 7, 8, 9], [0, 1, 2, 6, 4, 5, 7, 8, 6], id="class-absent-from-labels"),
    pytest.param([0, 0, 1, 1, 1], [0, 1, 1, 1, 0], id="classes-absent-from-both"),
    pytest.param([3], [3], id="single-row-right"),
    pytest.param([3], [5], id="single-row-wrong"),
    pytest.param([9, 9, 9], [8, 8, 8], id="all-wrong"),
])
def test_figures_match_sklearn_on_edge_cases(tmp_path, labels, predictions):
    figures = evaluate_predictions(write_predictions(tmp_path, labels, predictions)).to_json()

    assert_matches_sklearn(figures, labels, predictions)


def test_rows_without_a_label_are_left_out(tmp_path):
    labels = [0, None, 6, 6, None, 2]
    predictions = [0, 3, 0, 6, 6, 2]
    evaluation = evaluate_predictions(write_predictions(tmp_path, labels, predictions))

    assert evaluation.unlabeled == 2
    assert_matches_sklearn(evaluation.to_json(), [0, 6, 6, 2], [0, 0, 6, 2])


def test_json_follows_the_schema(realistic, tmp_path, capsys):
    directory, labels, predictions = realistic
    out = tmp_path / "report.json"

    assert main(["evaluate", str(directory), "--json", str(out)]) == 0

    figures = json.loads(out.read_text())
    assert set(figures) == {"accuracy", "n", "per_class", "macro_avg", "weighted_avg", "confusion_matrix"}
    assert len(figures["per_class"]) == 10
    assert all(set(c) == {"class", "precision", "recall", "f1", "support"} for c in figures["per_class"])
    for key in ("macro_avg", "weighted_avg"):
        assert set(figures[key]) == {"precision", "recall", "f1", "support"}
    assert np.array(figures["confusion_matrix"]).shape == (10, 10)
    assert all(isinstance(x, int) for row in figures["confusion_matrix"] for x in row)
    assert_matches_sklearn(figures, labels, predictions)
    assert os.listdir(tmp_path) == ["report.json"]  # no temporary file left behind


def test_plot_is_a_png(realistic, tmp_path, capsys):
    directory, _, _ = realistic
    out = tmp_path / "confusion_matrix.png"

    assert main(["evaluate", str(directory), "--plot", str(out)]) == 0

    with Image.open(out) as image:
        assert image.format == "PNG"
        assert image.width > 400 and image.height > 400
        image.verify()
    assert os.listdir(tmp_path) == ["confusion_matrix.png"]


def test_report_shows_the_figures_a_person_looks_for(realistic):
    directory, _, _ = realistic
    evaluation = evaluate_predictions(directory)
    for width in (80, 140):  # class numbers head the matrix columns where names do not fit
        console = Console(record=True, width=width)
        print_report(evaluation, console)
        text = console.export_text()

        assert f"{evaluation.accuracy:.2%}" in text
        assert CHECKPOINT in text
        assert "Shirt vs T-shirt/top" in text or "T-shirt/top vs Shirt" in text
        assert all(name in text for name in CLASS_NAMES)
        assert "macro avg" in text and "weighted avg" in text
        assert max(len(line) for line in text.splitlines()) <= width


@pytest.mark.parametrize("threshold, code", [("0.5", 0), ("0.95", 1)])
def test_min_accuracy_sets_the_exit_code(realistic, capsys, threshold, code):
    directory, _, _ = realistic

    assert main(["evaluate", str(directory), "--min-accuracy", threshold]) == code

    err = capsys.readouterr().err
    assert ("below --min-accuracy" in err) == (code == 1)


def test_min_accuracy_met_exactly_passes(tmp_path, capsys):
    directory = write_predictions(tmp_path / "p", [0, 1, 2, 3], [0, 1, 2, 0])

    assert main(["evaluate", str(directory), "--min-accuracy", "0.75"]) == 0


def _write_table(directory: Path, table: pa.Table) -> Path:
    return committed(directory, {"part-000.parquet": table})


def _missing(tmp_path):
    return tmp_path / "nowhere"


def _empty_dir(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.csv").write_text("label,prediction\n1,1\n")
    return tmp_path / "empty"


def _not_parquet(tmp_path):
    return committed(tmp_path / "bad", {"part-000.parquet": b"not parquet"})


def _no_manifest(tmp_path):
    """Predictions whose scoring run did not finish: data, but no _SUCCESS."""
    (tmp_path / "p").mkdir()
    pq.write_table(pa.table({"label": pa.array([1], pa.int64()), "prediction": pa.array([1], pa.int64())}),
                   tmp_path / "p" / "part-000.parquet")
    return tmp_path / "p"


def _no_label_column(tmp_path):
    return _write_table(tmp_path / "p", pa.table({"prediction": pa.array([1, 2], pa.int64())}))


def _string_labels(tmp_path):
    return _write_table(tmp_path / "p", pa.table({"label": ["Shirt"], "prediction": pa.array([6], pa.int64())}))


def _no_labels(tmp_path):
    return write_predictions(tmp_path / "p", [None, None], [1, 2])


def _zero_rows(tmp_path):
    return write_predictions(tmp_path / "p", [], [])


def _label_out_of_range(tmp_path):
    return write_predictions(tmp_path / "p", [1, 10], [1, 2])


def _label_beyond_int64(tmp_path):
    return _write_table(tmp_path / "p", pa.table({"label": pa.array([2**63], pa.uint64()),
                                                  "prediction": pa.array([1], pa.int64())}))


def _damaged_data_pages(tmp_path):
    """A file whose footer is intact but whose column data is not."""
    directory = _write_table(tmp_path / "p", pa.table({"label": pa.array(range(10_000), pa.int64()),
                                                       "prediction": pa.array(range(10_000), pa.int64())}))
    file = directory / "part-000.parquet"
    data = bytearray(file.read_bytes())
    data[4:2004] = b"\xff" * 2000
    file.write_bytes(bytes(data))
    return directory


@pytest.mark.parametrize("make, words", [
    (_missing, "does not exist"),
    (_empty_dir, "no .parquet files"),
    (_not_parquet, "not a readable Parquet file"),
    (_no_manifest, "is incomplete (no _SUCCESS)"),
    (_no_label_column, "no 'label' column"),
    (_string_labels, "not an integer class index"),
    (_no_labels, "evaluation needs the true class"),
    (_zero_rows, "zero rows"),
    (_label_out_of_range, "not a class index"),
    (_label_beyond_int64, "cannot read"),
    (_damaged_data_pages, "cannot read"),
])
def test_bad_input_is_one_error_line_and_exit_2(tmp_path, capsys, make, words):
    out = tmp_path / "out"
    out.mkdir()
    directory = make(tmp_path)

    code = main(["evaluate", str(directory), "--json", str(out / "r.json"), "--plot", str(out / "c.png")])

    captured = capsys.readouterr()
    assert code == 2 and captured.out == ""  # no report printed before the error
    assert captured.err.startswith("error: ") and captured.err.count("\n") == 1 and words in captured.err
    assert os.listdir(out) == []


def test_report_files_never_overwrite_the_predictions_or_each_other(realistic, tmp_path, capsys):
    directory, _, _ = realistic
    parquet = sorted(directory.glob("*.parquet"))[0]
    before = parquet.read_bytes()
    assert main(["evaluate", str(directory), "--json", str(parquet)]) == 2
    assert "is one of the predictions" in one_error_line(capsys)
    assert main(["evaluate", str(directory), "--json", str(tmp_path / "r"), "--plot", str(tmp_path / "r")]) == 2
    assert "name the same file" in one_error_line(capsys)
    assert parquet.read_bytes() == before and os.listdir(tmp_path) == []


@pytest.mark.parametrize("option", ["--json", "--plot"])
def test_unwritable_output_is_exit_2_and_leaves_nothing(realistic, tmp_path, capsys, option):
    directory, _, _ = realistic
    target = tmp_path / "missing-dir" / "out"

    assert main(["evaluate", str(directory), option, str(target)]) == 2

    captured = capsys.readouterr()
    assert captured.err.startswith(f"error: argument {option}: directory") and captured.err.count("\n") == 1
    assert captured.out == ""  # refused before the work, not after printing the report
    assert os.listdir(tmp_path) == []


def test_min_accuracy_must_be_a_fraction(realistic, capsys):
    directory, _, _ = realistic

    assert main(["evaluate", str(directory), "--min-accuracy", "88"]) == 2
    assert one_error_line(capsys).startswith("error: argument --min-accuracy: expected a fraction in [0, 1]")


def test_workflow_script(realistic, tmp_path):
    directory, _, _ = realistic
    out = tmp_path / "report.json"

    result = subprocess.run(
        [sys.executable, str(REPO / "workflows" / "evaluate.py"), str(directory), "--json", str(out),
         "--min-accuracy", "0.8"],
        capture_output=True, text=True, cwd=tmp_path, timeout=120,
    )

    assert result.returncode == 0, result.stderr
    assert "Classification report" in result.stdout and "Confusion matrix" in result.stdout
    assert json.loads(out.read_text())["n"] == 10_000
