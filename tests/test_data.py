"""Finding, reading and validating Fashion-MNIST."""

from __future__ import annotations

import gzip
import shutil
import struct

import numpy as np
import pytest

from fmnist.cli import main
from fmnist.core.data import find_data_dir, load_fashion_mnist, read_idx
from fmnist.core.errors import InputError

from conftest import one_error_line


@pytest.fixture
def data_copy(tmp_path, real_data_dir):
    """A writable, uncompressed copy of the real data set, to break in various ways."""
    out = tmp_path / "fmnist"
    out.mkdir()
    for gz in real_data_dir.glob("*.gz"):
        with gzip.open(gz, "rb") as src, open(out / gz.stem, "wb") as dst:
            shutil.copyfileobj(src, dst)
    return out


def test_real_data_loads_with_expected_shapes(real_data_dir, no_data_env):
    data = load_fashion_mnist(real_data_dir)
    assert data.train_images.shape == (60_000, 28, 28) and data.train_images.dtype == np.uint8
    assert data.test_images.shape == (10_000, 28, 28)
    assert data.train_labels.shape == (60_000,) and data.test_labels.shape == (10_000,)
    assert set(np.unique(data.train_labels)) == set(range(10))
    assert np.bincount(data.test_labels).tolist() == [1000] * 10


def test_gzipped_and_plain_files_read_the_same(real_data_dir, data_copy, no_data_env):
    plain, gz = load_fashion_mnist(data_copy), load_fashion_mnist(real_data_dir)
    assert np.array_equal(plain.train_images, gz.train_images)
    assert np.array_equal(plain.test_labels, gz.test_labels)


def test_env_var_names_the_directory(data_copy, no_data_env, monkeypatch):
    monkeypatch.setenv("FMNIST_DATA_DIR", str(data_copy))
    assert load_fashion_mnist().source == data_copy


def _patch(path, offset, data: bytes):
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def _damaged_gzip(path):
    """``path`` replaced by a .gz of it whose compressed body is damaged."""
    packed = bytearray(gzip.compress(path.read_bytes()))
    packed[40:240] = bytes(200)
    path.with_name(path.name + ".gz").write_bytes(bytes(packed))
    path.unlink()


@pytest.mark.parametrize(
    "breakage, message",
    [
        (lambda d: (d / "train-images-idx3-ubyte").write_bytes(
            (d / "train-images-idx3-ubyte").read_bytes()[:-100]), "truncated"),
        (lambda d: _patch(d / "t10k-images-idx3-ubyte", 0, struct.pack(">i", 2049)), "magic number 2049"),
        (lambda d: _patch(d / "t10k-labels-idx1-ubyte", 4, struct.pack(">i", 9_999)), "holds 9999 items"),
        (lambda d: _patch(d / "train-labels-idx1-ubyte", 8 + 123, bytes([10])), "label 10"),
        (lambda d: (d / "t10k-labels-idx1-ubyte").unlink(), "t10k-labels-idx1-ubyte[.gz] not found"),
        (lambda d: (d / "t10k-images-idx3-ubyte").write_bytes(
            (d / "t10k-images-idx3-ubyte").read_bytes()[:10]), "not an IDX file"),
        (lambda d: _damaged_gzip(d / "train-labels-idx1-ubyte"), "cannot read"),
    ],
    ids=["truncated", "wrong-magic", "wrong-count", "bad-label", "missing-file", "header-cut-short", "damaged-gzip"],
)
def test_bad_files_are_named(data_copy, no_data_env, breakage, message):
    breakage(data_copy)
    with pytest.raises(InputError, match=message.replace("[", r"\[").replace("]", r"\]")) as err:
        load_fashion_mnist(data_copy)
    assert str(data_copy) in str(err.value)


def test_wrong_item_shape_is_refused(tmp_path):
    path = tmp_path / "images"
    path.write_bytes(struct.pack(">iiii", 2051, 2, 27, 28) + bytes(2 * 27 * 28))
    with pytest.raises(InputError, match=r"shape \(27, 28\)"):
        read_idx(path, 2051, 2, (28, 28))


def test_explicit_empty_dir_is_not_replaced_by_another_source(tmp_path, no_data_env):
    # The system package is installed, yet a directory the user named is the only one used.
    with pytest.raises(InputError, match=f"{tmp_path}/train-images-idx3-ubyte"):
        load_fashion_mnist(tmp_path)


def test_train_with_missing_data_exits_2_with_one_line_and_writes_nothing(tmp_path, no_data_env, capsys):
    runs = tmp_path / "runs"
    code = main(["train", "--data-dir", str(tmp_path / "nowhere"), "--storage-path", str(runs)])
    err = one_error_line(capsys)
    assert code == 2
    assert "nowhere" in err and "apt-get install dataset-fashion-mnist" in err
    assert not runs.exists()


def test_the_local_cache_comes_before_the_system_package(data_copy, no_data_env, tmp_path):
    cache = tmp_path / "cache" / "fmnist"
    shutil.copytree(data_copy, cache)
    assert load_fashion_mnist().source == cache


def test_a_file_given_as_the_data_dir_is_named_as_such(tmp_path, no_data_env):
    (tmp_path / "images.gz").write_bytes(b"")
    with pytest.raises(InputError, match="images.gz is not a directory"):
        find_data_dir(tmp_path / "images.gz")
