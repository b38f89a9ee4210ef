"""A picture of the mistakes: for the most confused class pairs, the images the model got wrong
with the highest confidence, each captioned true -> predicted (confidence).

The images come from what was scored: the test set (by id), image files (by the predictions'
``path``), or a Parquet input (by id, from its ``image`` column). Tiles are the images' own
pixels, enlarged, placed pixel for pixel (``figimage``), so they can be checked against the source.
"""

from __future__ import annotations

import io
import os
from typing import NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from fmnist.core.errors import InputError
from fmnist.core.images import UnreadableImage, read_image
from fmnist.core.inputs import images_by_id, open_input
from fmnist.core.model_config import CLASS_NAMES
from fmnist.core.storage import StoragePath
from fmnist.evaluate.metrics import ConfusedPair, Evaluation, prediction_files, write_report_file

PAIRS, PER_PAIR = 4, 8  # rows of the grid (class pairs), and mistakes shown per pair
SCALE = 4  # each 28x28 image is shown as 112x112 pixels
TILE = 28 * SCALE
DPI = 100
MARGIN, GAP, TITLE, HEADING, CAPTION = 20, 28, 64, 28, 40  # pixels
COLUMNS = ("id", "path", "label", "prediction", "confidence")


class Mistake(NamedTuple):
    id: int
    path: str | None
    label: int
    prediction: int
    confidence: float


class MistakeRow(NamedTuple):
    pair: ConfusedPair
    mistakes: list[Mistake]
    images: list[np.ndarray]  # (28, 28) uint8, one per mistake


def worst_mistakes(predictions: str | os.PathLike, evaluation: Evaluation, pairs: int = PAIRS,
                   per_pair: int = PER_PAIR) -> list[tuple[ConfusedPair, list[Mistake]]]:
    """For each of the ``pairs`` most confused class pairs, its ``per_pair`` most confident mistakes
    (either way), most confident first; ties by id."""
    table = _wrong_rows(predictions)
    chosen = []
    for pair in evaluation.most_confused(pairs):
        both = {pair.a, pair.b}
        rows = [Mistake(*r.values()) for r in table.to_pylist() if {r["label"], r["prediction"]} == both]
        rows.sort(key=lambda m: (-m.confidence, m.id))
        chosen.append((pair, rows[:per_pair]))
    return chosen


def _wrong_rows(predictions: str | os.PathLike) -> pa.Table:
    location = StoragePath.parse(str(predictions), "predictions")
    try:
        files = prediction_files(location)
        schema = pq.read_schema(files[0].path, filesystem=files[0].fs)
        missing = [c for c in COLUMNS if c not in schema.names]
        if missing:
            raise InputError(f"the predictions in {location.uri} have no '{missing[0]}' column; --mistakes needs "
                             "predictions written by 'fmnist score'")
        table = pa.concat_tables(pq.read_table(f.path, filesystem=f.fs, columns=list(COLUMNS)) for f in files)
    except (pa.ArrowException, OSError) as e:
        raise InputError(f"cannot read the predictions in {location.uri} ({' '.join(str(e).split())})") from None
    table = table.filter(pc.and_(pc.is_valid(table["label"]), pc.not_equal(table["label"], table["prediction"])))
    return table.cast(pa.schema([("id", pa.int64()), ("path", pa.string()), ("label", pa.int64()),
                                 ("prediction", pa.int64()), ("confidence", pa.float64())]))


def mistake_images(mistakes: list[Mistake], images: str | None, data_dir: str | None = None) -> list[np.ndarray]:
    """The (28, 28) images of ``mistakes``: from the files the predictions name where they name them all,
    else from ``images`` (what was scored: 'test', an image directory or Parquet, as score's --input) by id.

    Raises InputError where the input lacks an id, or holds another label than the predictions: the
    predictions were scored from something else.
    """
    if images is None and all(m.path for m in mistakes):
        return [_read_file(m.path) for m in mistakes]
    spec = images or "test"
    if spec != "test" and not StoragePath.parse(spec, "--images").exists():
        raise InputError(f"--images {spec} does not exist; pass the --input the predictions were scored from")
    found = images_by_id(open_input(spec, data_dir, CLASS_NAMES), [m.id for m in mistakes])
    hint = "pass --images with the --input the predictions were scored from"
    out = []
    for m in mistakes:
        if m.id not in found:
            raise InputError(f"--images {spec} has no image with id {m.id}; {hint}")
        image, label = found[m.id]
        if label is not None and label != m.label:
            raise InputError(f"image {m.id} of --images {spec} is a {CLASS_NAMES[label]}, but the predictions "
                             f"say {CLASS_NAMES[m.label]}; {hint}")
        out.append(image)
    return out


def _read_file(path: str) -> np.ndarray:
    try:
        return read_image(StoragePath.parse(path, "image").read_bytes())
    except (UnreadableImage, OSError) as e:
        raise InputError(f"cannot read image {path} named in the predictions ({e}); pass --images") from None


def mistakes_png(evaluation: Evaluation, rows: list[MistakeRow]) -> bytes:
    """The grid: a row per class pair, headed by its counts; each tile captioned true -> predicted (confidence)."""
    from matplotlib.figure import Figure  # not pyplot: no display, and no global backend switched

    names = evaluation.class_names
    columns = max([len(r.mistakes) for r in rows] + [PER_PAIR])
    width = 2 * MARGIN + columns * TILE + (columns - 1) * GAP
    row_height = HEADING + TILE + CAPTION
    height = TITLE + max(len(rows), 1) * row_height + MARGIN
    fig = Figure(figsize=(width / DPI, height / DPI), dpi=DPI)
    fig.patch.set_facecolor("white")

    def text(x: float, y: float, s: str, **kw) -> None:  # x, y in pixels from the top left
        fig.text(x / width, 1 - y / height, s, va="top", **kw)

    wrong = evaluation.n - evaluation.correct
    text(MARGIN, 12, f"Most confident mistakes: {wrong:,} of {evaluation.n:,} images wrong "
                     f"(accuracy {evaluation.accuracy:.2%})", fontsize=13, weight="bold")
    text(MARGIN, 38, "Under each image: its true class → the class predicted (the model's confidence)", fontsize=10,
         color="#555555")
    if not rows:
        text(MARGIN, TITLE + 10, "No mistakes: every labelled image is classified right.", fontsize=12)
    for r, row in enumerate(rows):
        top = TITLE + r * row_height
        p = row.pair
        a, b, a_as_b, b_as_a = p if p.a_as_b >= p.b_as_a else (p.b, p.a, p.b_as_a, p.a_as_b)
        text(MARGIN, top + 4, f"{names[a]} vs {names[b]}: {p.total:,} mistakes "
                              f"({names[a]} as {names[b]} {a_as_b:,}, {names[b]} as {names[a]} {b_as_a:,})",
             fontsize=11, weight="bold", color="#333333")
        for c, (mistake, image) in enumerate(zip(row.mistakes, row.images)):
            x = MARGIN + c * (TILE + GAP)
            tile = np.kron(image, np.ones((SCALE, SCALE), np.uint8))
            fig.figimage(np.repeat(tile[:, :, None], 3, axis=2), xo=x, yo=height - (top + HEADING + TILE),
                         origin="upper")
            text(x + TILE / 2, top + HEADING + TILE + 4,
                 f"{names[mistake.label]} →\n{names[mistake.prediction]} ({mistake.confidence:.1%})",
                 fontsize=9, ha="center", linespacing=1.2)
    out = io.BytesIO()
    fig.savefig(out, format="png", dpi=DPI)
    return out.getvalue()


def write_mistakes(predictions: str | os.PathLike, evaluation: Evaluation, path: str | os.PathLike,
                   images: str | None = None, data_dir: str | None = None) -> bytes:
    """Pick, fetch, draw and write the picture (whole) to ``path``; returns the PNG."""
    png = render_mistakes(predictions, evaluation, images, data_dir)
    write_report_file(path, png, "--mistakes")
    return png


def render_mistakes(predictions: str | os.PathLike, evaluation: Evaluation, images: str | None = None,
                    data_dir: str | None = None) -> bytes:
    """The picture's PNG (see mistakes_png), its images fetched as mistake_images does."""
    chosen = worst_mistakes(predictions, evaluation)
    flat = [m for _, mistakes in chosen for m in mistakes]
    pictures = iter(mistake_images(flat, images, data_dir)) if flat else iter(())
    rows = [MistakeRow(pair, mistakes, [next(pictures) for _ in mistakes]) for pair, mistakes in chosen]
    return mistakes_png(evaluation, rows)
