"""Object storage end to end, on a real S3 API (moto's server on 127.0.0.1): train, score, evaluate,
the pipeline, committed outputs, and the bad inputs of object storage."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import PNG_MAGIC, REPO, interrupt, one_error_line, png_bytes, request, start, wait_until
from fmnist.cli import main
from fmnist.core.data import load_test_split
from fmnist.core.model import CLASS_NAMES
from s3_server import AuthenticatingS3Server, S3Server

pytestmark = pytest.mark.slow  # a real S3 API, and whole jobs on it

def read_s3_predictions(s3, bucket: str, prefix: str) -> pa.Table:
    """Every Parquet file under the prefix (read with boto3, not with the code under test), by id."""
    tables = [pq.read_table(io.BytesIO(s3.get(bucket, key))) for key in s3.keys(bucket, prefix + "/")
              if key.endswith(".parquet")]
    return pa.concat_tables(tables).sort_by("id")


def manifest(s3, bucket: str, prefix: str) -> dict:
    return json.loads(s3.get(bucket, f"{prefix}/_SUCCESS"))


@pytest.fixture(scope="module")
def fashion_test_set(real_data_dir):
    return load_test_split(real_data_dir)


@pytest.fixture(scope="module")
def local_predictions(ray_session, trained_run, real_data_dir, tmp_path_factory):
    """The test set scored into a local directory: what every S3 job must equal."""
    out = tmp_path_factory.mktemp("local") / "predictions"
    assert main(["score", "--checkpoint", trained_run.run_dir, "--output", str(out),
                 "--data-dir", str(real_data_dir)]) == 0
    return out


# ----------------------------------------------------------------------------- training


def test_training_interrupted_and_resumed_on_s3(ray_session, s3_server, bucket, real_data_dir):
    storage = f"s3://{bucket}/runs"
    options = ["--epochs", "2", "--num-workers", "2", "--cpus-per-worker", "1", "--storage-path", storage,
               "--name", "cut", "--data-dir", str(real_data_dir)]
    # A real Ctrl-C once epoch 1 is on S3.
    proc = start([sys.executable, str(REPO / "workflows" / "train.py"), *options])
    wait_until(proc, lambda: "runs/cut/history.csv" in s3_server.keys(bucket, "runs/cut/"), poll_s=0.2)
    output = interrupt(proc)
    assert proc.returncode == 130, output
    assert f"--resume --storage-path {storage} --name cut" in " ".join(output.split())

    assert main(["train", "--resume", "--storage-path", storage, "--name", "cut", "--cpus-per-worker", "1",
                 "--data-dir", str(real_data_dir)]) == 0
    history = s3_server.get(bucket, "runs/cut/history.csv").decode().splitlines()
    assert [line.split(",")[0] for line in history[1:]] == ["1", "2"]
    assert any(k.startswith("runs/cut/checkpoint_") for k in s3_server.keys(bucket, "runs/cut/"))


# ----------------------------------------------------------------------------- scoring and evaluation


def test_test_set_scored_into_s3_and_evaluated_there_equals_the_local_job(
        ray_session, s3_server, bucket, trained_run, local_predictions, real_data_dir, tmp_path, capsys):
    output = f"s3://{bucket}/predictions/test"
    assert main(["score", "--checkpoint", trained_run.run_dir, "--output", output,
                 "--data-dir", str(real_data_dir)]) == 0
    s3 = read_s3_predictions(s3_server, bucket, "predictions/test")
    local = pq.read_table(local_predictions).sort_by("id")
    assert s3.drop_columns(["probabilities"]).equals(local.drop_columns(["probabilities"]))
    committed = manifest(s3_server, bucket, "predictions/test")
    assert committed["rows"] == 10_000 and committed["input"] == "test"
    assert committed["checkpoint"] == trained_run.best_checkpoint
    assert sorted(f"predictions/test/{f}" for f in committed["files"]) == [
        k for k in s3_server.keys(bucket, "predictions/test/") if k.endswith(".parquet")]
    assert [f[0] for f in committed["schema"]] == local.column_names
    assert not [k for k in s3_server.keys(bucket) if ".incomplete-" in k]  # no staging left

    # evaluate on S3 (report files on S3 too) gives the figures of evaluate on the local files.
    capsys.readouterr()
    assert main(["evaluate", output, "--json", f"s3://{bucket}/reports/r.json",
                 "--plot", f"s3://{bucket}/reports/c.png"]) == 0
    assert output in capsys.readouterr().out
    assert main(["evaluate", str(local_predictions), "--json", str(tmp_path / "r.json")]) == 0
    assert json.loads(s3_server.get(bucket, "reports/r.json")) == json.loads((tmp_path / "r.json").read_text())
    assert s3_server.get(bucket, "reports/c.png")[:8] == PNG_MAGIC


def test_a_parquet_prefix_on_s3_scored_into_s3(ray_session, s3_server, bucket, trained_run, local_predictions,
                                               fashion_test_set):
    images, labels = fashion_test_set
    pixels = pa.FixedSizeListArray.from_arrays(pa.array(images[:2000].reshape(-1)), 784)
    table = pa.table({"image": pixels, "label": labels[:2000]})
    for k in range(4):  # 4 files under nested prefixes; no id column: ids are positions in path order
        buffer = io.BytesIO()
        pq.write_table(table.slice(500 * k, 500), buffer)
        s3_server.put(bucket, f"in/part={k}/data.parquet", buffer.getvalue())
    output = f"s3://{bucket}/out"
    assert main(["score", "--checkpoint", trained_run.run_dir, "--input", f"s3://{bucket}/in",
                 "--output", output, "--batch-size", "256"]) == 0
    got = read_s3_predictions(s3_server, bucket, "out")
    want = pq.read_table(local_predictions).sort_by("id").slice(0, 2000)
    assert got["id"].to_pylist() == list(range(2000))
    assert got["label"].equals(want["label"]) and got["prediction"].equals(want["prediction"])
    assert manifest(s3_server, bucket, "out")["input"] == f"s3://{bucket}/in"


def test_an_image_prefix_with_class_subprefixes_on_s3_scored_into_s3(
        ray_session, s3_server, bucket, trained_run, local_predictions, fashion_test_set):
    images, labels = fashion_test_set
    expected = {}  # uri -> (test index, label from its prefix or None)
    for i in range(24):
        folder = f"images/{CLASS_NAMES[labels[i]].replace('/', '_')}/" if i < 20 else "images/"
        s3_server.put(bucket, f"{folder}{i:03d}.png", png_bytes(images[i]))
        expected[f"s3://{bucket}/{folder}{i:03d}.png"] = (i, int(labels[i]) if i < 20 else None)
    s3_server.put(bucket, "images/notes.txt", b"not an image, not read")
    assert main(["score", "--checkpoint", trained_run.run_dir, "--input", f"s3://{bucket}/images",
                 "--output", f"s3://{bucket}/scored", "--batch-size", "8"]) == 0
    got = read_s3_predictions(s3_server, bucket, "scored")
    assert got["path"].to_pylist() == sorted(expected)
    want = pq.read_table(local_predictions).sort_by("id")
    by_path = dict(zip(got["path"].to_pylist(), zip(got["label"].to_pylist(), got["prediction"].to_pylist())))
    for uri, (i, label) in expected.items():
        assert by_path[uri] == (label, want["prediction"][i].as_py())


# ----------------------------------------------------------------------------- the pipeline


def test_pipeline_on_s3_leaves_everything_in_the_run_prefix(ray_session, s3_server, bucket, real_data_dir, capsys):
    assert main(["pipeline", "--epochs", "1", "--storage-path", f"s3://{bucket}/runs", "--name", "p",
                 "--data-dir", str(real_data_dir)]) == 0
    keys = s3_server.keys(bucket, "runs/p/")
    for name in ("history.csv", "loss_curve.png", "train_config.json", "report.json", "confusion_matrix.png",
                 "predictions/_SUCCESS"):
        assert f"runs/p/{name}" in keys, keys
    report = json.loads(s3_server.get(bucket, "runs/p/report.json"))
    trained_accuracy = float(s3_server.get(bucket, "runs/p/history.csv").decode().splitlines()[1].split(",")[3])
    assert report["n"] == 10_000 and abs(report["accuracy"] - trained_accuracy) <= 1e-4
    assert s3_server.get(bucket, "runs/p/confusion_matrix.png")[:8] == PNG_MAGIC
    assert f"s3://{bucket}/runs/p/report.json" in capsys.readouterr().out


# ----------------------------------------------------------------------------- bad input


def _seconds(command: list[str]) -> tuple[int, float]:
    started = time.monotonic()
    code = main(command)
    return code, time.monotonic() - started


@pytest.fixture
def checkpoint_on_s3(s3_server, bucket, trained_run) -> str:
    """The trained run's best checkpoint copied to s3://<bucket>/run/<its name>."""
    best = trained_run.best_checkpoint
    name = os.path.basename(best)
    for file in os.listdir(best):
        with open(os.path.join(best, file), "rb") as f:
            s3_server.put(bucket, f"run/{name}/{file}", f.read())
    return f"s3://{bucket}/run/{name}"


def _bad_s3_input(case: str, bucket: str, s3, checkpoint: str) -> tuple[list[str], str]:
    """Options that make ``case`` (with ``--checkpoint`` on S3), and what the error line must say."""
    if case == "missing bucket (output)":
        return ["--output", "s3://no-such-bucket-fmnist/p"], "bucket no-such-bucket-fmnist does not exist"
    if case == "missing bucket (input)":
        return ["--input", "s3://no-such-bucket-fmnist/in", "--output", f"s3://{bucket}/p"], \
            "bucket no-such-bucket-fmnist does not exist"
    if case == "missing input prefix":
        return ["--input", f"s3://{bucket}/nothing", "--output", f"s3://{bucket}/p"], "does not exist"
    if case == "empty input prefix":
        s3.put(bucket, "empty/readme.txt", b"no images here")
        return ["--input", f"s3://{bucket}/empty", "--output", f"s3://{bucket}/p"], "holds no PNG/JPEG images"
    if case == "existing output":
        s3.put(bucket, "p/part-0.parquet", b"earlier predictions")
        return ["--output", f"s3://{bucket}/p"], "already exists; pass --overwrite"
    if case == "output holding the input":
        s3.put(bucket, "data/in/0.png", b"an image")
        return ["--input", f"s3://{bucket}/data/in", "--output", f"s3://{bucket}/data", "--overwrite"], \
            "holds --input"
    if case == "output holding the checkpoint":
        return ["--output", f"s3://{bucket}/run", "--overwrite"], "holds --checkpoint"
    if case == "keys in the URI":
        return ["--output", f"s3://AKIAKEY:SECRETKEY@{bucket}/p"], "keys in a URI would show"
    assert case == "output a bucket"
    return ["--output", f"s3://{bucket}"], "is a bucket"


@pytest.mark.parametrize("case", ["missing bucket (output)", "missing bucket (input)", "missing input prefix",
                                  "empty input prefix", "existing output", "output holding the input",
                                  "output holding the checkpoint", "output a bucket", "keys in the URI"])
def test_bad_object_storage_input_is_one_line_in_seconds_and_writes_nothing(
        ray_session, s3_server, bucket, checkpoint_on_s3, capsys, case):
    options, words = _bad_s3_input(case, bucket, s3_server, checkpoint_on_s3)
    before = s3_server.keys(bucket)
    code, seconds = _seconds(["score", "--checkpoint", checkpoint_on_s3, *options])
    line = one_error_line(capsys)
    assert code == 2 and words in line and "SECRETKEY" not in line
    assert seconds < 10
    assert s3_server.keys(bucket) == before


@pytest.fixture
def authenticating_server(monkeypatch):
    """A second S3 server that checks credentials, in the driver's environment; stopped afterwards."""
    server = AuthenticatingS3Server()
    for name, value in server.env.items():
        monkeypatch.setenv(name, value)
    yield server
    server.stop()


@pytest.mark.parametrize("command", ["score", "evaluate", "train"])
def test_refused_credentials_missing_credentials_and_a_dead_endpoint_are_one_line_in_seconds(
        authenticating_server, monkeypatch, tmp_path, capsys, command):
    location = f"s3://{authenticating_server.bucket}/x"
    argv = {"score": ["score", "--checkpoint", location, "--output", str(tmp_path / "p")],
            "evaluate": ["evaluate", location],
            "train": ["train", "--storage-path", location, "--data-dir", str(tmp_path)]}[command]
    # Keys the server never issued: refused.
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAWRONGKEY")
    code, seconds = _seconds(argv)
    line = one_error_line(capsys)
    assert code == 2 and seconds < 10 and "access denied" in line and "check the credentials" in line
    assert "testing-secret" not in line  # never a secret
    # No credentials anywhere in the chain.
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    code, seconds = _seconds(argv)
    assert code == 2 and seconds < 10 and "no AWS credentials found" in one_error_line(capsys)
    # An endpoint that does not answer: bounded timeouts and retries, not a hang.
    for name, value in authenticating_server.env.items():
        monkeypatch.setenv(name, value)
    authenticating_server.stop()
    code, seconds = _seconds(argv)
    assert code == 2 and seconds < 15 and "does not answer" in one_error_line(capsys)
    assert os.listdir(tmp_path) == []


# ----------------------------------------------------------------------------- committed output


def _score_process(env: dict, *options: str) -> subprocess.Popen:
    return start([sys.executable, str(REPO / "workflows" / "score.py"), *options], env={**os.environ, **env})


def test_a_scoring_run_killed_midway_leaves_no_success_and_evaluate_refuses_it(
        s3_server, bucket, trained_run, real_data_dir, capsys):
    output = f"s3://{bucket}/killed"
    proc = _score_process(s3_server.env, "--checkpoint", trained_run.run_dir, "--output", output,
                          "--data-dir", str(real_data_dir), "--batch-size", "64", "--concurrency", "1")
    # Killed as soon as the job has begun writing: its output is not committed yet.
    wait_until(proc, lambda: [k for k in s3_server.keys(bucket) if ".killed.incomplete-" in k], timeout_s=120)
    proc.kill()
    proc.wait()
    keys = s3_server.keys(bucket)
    assert not [k for k in keys if k.endswith("_SUCCESS")], keys
    assert main(["evaluate", output]) == 2
    assert "does not exist" in one_error_line(capsys)
    # What the staging prefix holds (data files, or not yet) is not predictions either.
    staging = sorted({k.split("/")[0] for k in keys if ".incomplete-" in k})[0]
    assert main(["evaluate", f"s3://{bucket}/{staging}"]) == 2
    line = one_error_line(capsys)
    assert "is incomplete (no _SUCCESS)" in line or "holds no .parquet files" in line


@pytest.fixture
def slow_server():
    """A second S3 server whose writes take 0.3 s each, so that a kill can land between the steps of a commit."""
    server = S3Server(write_delay_s=0.3)
    yield server
    server.stop()


def test_overwrite_killed_midway_never_shows_a_mixed_output_as_complete(
        slow_server, trained_run, local_predictions, real_data_dir, monkeypatch, capsys):
    """The old output stays complete until the new one is staged; killed in between, it reads as incomplete."""
    bucket = slow_server.new_bucket()
    old = pq.read_table(local_predictions).slice(0, 90)
    old_files = []
    for k in range(3):
        buffer = io.BytesIO()
        pq.write_table(old.slice(k * 30, 30), buffer)
        slow_server.put(bucket, f"p/old-{k}.parquet", buffer.getvalue())
        old_files.append(f"old-{k}.parquet")
    slow_server.put(bucket, "p/_SUCCESS", json.dumps({"files": old_files, "rows": 90, "schema": []}).encode())
    old_keys = sorted([*(f"p/{name}" for name in old_files), "p/_SUCCESS"])

    proc = _score_process(slow_server.env, "--checkpoint", trained_run.run_dir, "--output", f"s3://{bucket}/p",
                          "--overwrite", "--data-dir", str(real_data_dir))
    looks = []  # (keys under p/, new data files staged) at each look, until the old manifest goes

    def old_manifest_gone() -> bool:
        keys = slow_server.keys(bucket)
        looks.append(([k for k in keys if k.startswith("p/")],
                      [k for k in keys if k.startswith(".p.incomplete-") and k.endswith(".parquet")]))
        return "p/_SUCCESS" not in looks[-1][0]

    wait_until(proc, old_manifest_gone, poll_s=0)
    proc.kill()  # the moment the commit began: the old manifest is gone, the swap under way
    proc.wait()

    # Until then the old output was whole; the new one was fully staged before it was touched.
    assert all(listed == old_keys for listed, _ in looks[:-1])
    assert looks[-2][1], "the old output was touched before the new one was staged"
    for name, value in slow_server.env.items():
        monkeypatch.setenv(name, value)
    assert main(["evaluate", f"s3://{bucket}/p"]) == 2
    assert "is incomplete (no _SUCCESS)" in one_error_line(capsys)


def test_score_refuses_predictions_without_their_manifest_as_input(trained_run, local_predictions, tmp_path, capsys):
    # Our own output (its Parquet records the checkpoint) without _SUCCESS: a run that did not finish.
    partial = tmp_path / "partial"
    partial.mkdir()
    for file in local_predictions.glob("*.parquet"):
        (partial / file.name).write_bytes(file.read_bytes())
    assert main(["score", "--checkpoint", trained_run.run_dir, "--input", str(partial),
                 "--output", str(tmp_path / "again")]) == 2
    assert f"{partial} is incomplete (no _SUCCESS)" in one_error_line(capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["partial"]


def test_serve_switches_to_a_checkpoint_on_s3_that_its_replicas_load(server, s3_server, bucket, trained_run,
                                                                     fashion_test_set, monkeypatch):
    # The replicas load the checkpoint from its URI themselves, with the storage settings Ray's workers have.
    for file in Path(trained_run.best_checkpoint).iterdir():
        s3_server.put(bucket, f"served/{file.name}", file.read_bytes())
    for name, value in s3_server.env.items():  # the driver checks the checkpoint first, as a user's would
        monkeypatch.setenv(name, value)
    uri = f"s3://{bucket}/served"
    try:
        assert main(["serve", "--checkpoint", uri]) == 0
        status, answer, _ = request(f"{server}/predict", png_bytes(fashion_test_set[0][0]), "image/png")
        assert status == 200 and answer["checkpoint"] == uri
    finally:
        assert main(["serve", "--checkpoint", str(trained_run.best_checkpoint)]) == 0
