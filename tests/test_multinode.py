"""A real multi-node Ray cluster on one machine (ray.cluster_utils.Cluster): training and scoring."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import textwrap

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from conftest import REPO
from fmnist.core.data import load_test_split

pytestmark = pytest.mark.slow  # a three-node cluster in a process of its own

# The head has no CPUs, so nothing but the driver's bookkeeping runs there; each training worker
# asks for 2 CPUs, so the 2 workers must sit on different worker nodes. The nodes share this
# machine's disk, so the test checks what separate disks would need: no Ray worker opens the data
# files (an audit hook in each refuses them: only the driver reads them), and scoring's tasks
# that read its local inputs and write its local output all ran on the driver's node (Ray's
# task records). The same inputs on S3 (moto) are read, and the output written, by tasks on the
# worker nodes.
# A separate process: this test needs its own cluster, not the session's Ray instance.
SCRIPT = textwrap.dedent("""
    import os
    import sys
    import time
    import pyarrow as pa
    import pyarrow.parquet as pq
    import ray
    from PIL import Image
    from ray.cluster_utils import Cluster
    from ray.util.state import list_tasks
    sys.path.insert(0, {repo!r})
    from fmnist.cli import main
    from fmnist.core.data import load_test_split

    storage, data_dir, bucket = sys.argv[1], sys.argv[2], sys.argv[3]

    def forbid_the_data_files(data_dir=data_dir):  # in every Ray worker process of this job
        def refuse(event, args):
            if event == "open" and str(args[0]).startswith(data_dir):
                raise PermissionError(f"a Ray worker opened {{args[0]}}")
        sys.addaudithook(refuse)

    cluster = Cluster(initialize_head=True, head_node_args={{"num_cpus": 0, "include_dashboard": True}})
    for _ in range(2):
        cluster.add_node(num_cpus=2)
    ray.init(address=cluster.address, runtime_env={{"worker_process_setup_hook": forbid_the_data_files}})

    @ray.remote
    def try_to_read(path):
        try:
            open(path, "rb").close()
        except PermissionError:
            return "refused"
    assert ray.get(try_to_read.remote(os.path.join(data_dir, os.listdir(data_dir)[0]))) == "refused"

    # Scoring inputs on the driver's disk: the test set as Parquet, and a folder of images.
    images, labels = load_test_split(data_dir)
    pq.write_table(pa.table({{"image": pa.FixedSizeListArray.from_arrays(pa.array(images.reshape(-1)), 784),
                              "label": labels}}), os.path.join(storage, "test.parquet"))
    os.makedirs(os.path.join(storage, "images"))
    for i in range(3):
        Image.fromarray(images[i]).save(os.path.join(storage, "images", f"{{i}}.png"))

    # 4 CPUs in all, but no node has 3: refused (one line, exit 2), not left waiting forever.
    assert main(["train", "--num-workers", "1", "--cpus-per-worker", "3", "--resource-timeout", "1",
                 "--storage-path", storage, "--name", "too-big", "--data-dir", data_dir]) == 2
    code = main(["train", "--epochs", "1", "--num-workers", "2", "--cpus-per-worker", "2",
                 "--storage-path", storage, "--name", "multi", "--data-dir", data_dir])
    s3 = f"s3://{{bucket}}"
    for input, output in (("test", "predictions"), (storage + "/test.parquet", "from_parquet"),
                          (storage + "/images", "from_images"), (s3 + "/parquet", s3 + "/from_parquet"),
                          (s3 + "/images", s3 + "/from_images")):
        if code == 0:
            output = output if "://" in output else os.path.join(storage, output)
            code = main(["score", "--checkpoint", storage + "/multi", "--input", input, "--output", output,
                         "--concurrency", "2", "--data-dir", data_dir])

    # On the driver's node (True) for the local paths; on the worker nodes (False) for S3, where
    # Ray fuses reading, scoring and writing into one task. Scoring alone, of local files, runs
    # where the CPUs are: the worker nodes (the head has none).
    head = cluster.head_node.node_id
    scored = "MapBatches(_score_on_cpu)"
    expected = {{
        ("Read_ParquetRowGroups", True), ("MapBatches(_decode_image_files)", True), ("Write", True), (scored, False),
        (f"Read_ParquetRowGroups->{{scored}}->Write", False), (f"MapBatches(_decode_image_files)->{{scored}}->Write", False),
    }}
    deadline = time.monotonic() + 30  # task records reach the state API a moment after their tasks
    while True:
        normal_tasks = list_tasks(filters=[("type", "=", "NORMAL_TASK")], detail=True, limit=10_000)
        file_tasks = {{(t.name, t.node_id == head) for t in normal_tasks
                      if t.name.startswith(("Read", "Write", "MapBatches")) and t.node_id is not None}}
        if code or file_tasks >= expected or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    print("scoring's tasks (name, on the driver's node):", sorted(file_tasks))
    ray.shutdown()
    cluster.shutdown()
    sys.exit(code or file_tasks != expected)
""")


def test_training_and_scoring_on_a_three_node_cluster(real_data_dir, tmp_path, s3_server, bucket):
    images, labels = load_test_split(real_data_dir)
    pixels = pa.FixedSizeListArray.from_arrays(pa.array(images[:2000].reshape(-1)), 784)
    for k in range(4):  # 4 files: 4 read tasks, on whichever nodes have room
        buffer = io.BytesIO()
        pq.write_table(pa.table({"image": pixels.slice(500 * k, 500), "label": labels[500 * k:500 * (k + 1)]}),
                       buffer)
        s3_server.put(bucket, f"parquet/{k}.parquet", buffer.getvalue())
    for i in range(3):
        image = io.BytesIO()
        Image.fromarray(images[i]).save(image, format="PNG")
        s3_server.put(bucket, f"images/{i}.png", image.getvalue())
    # The nodes start with this environment: the S3 server's endpoint and credentials.
    run = subprocess.run([sys.executable, "-c", SCRIPT.format(repo=str(REPO)), str(tmp_path), str(real_data_dir),
                          bucket], capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout + run.stderr
    assert (tmp_path / "multi" / "history.csv").read_text().count("\n") == 2
    assert pq.read_table(tmp_path / "predictions").num_rows == 10_000
    assert pq.read_table(tmp_path / "from_parquet").num_rows == 10_000
    assert pq.read_table(tmp_path / "from_images").num_rows == 3
    assert json.loads(s3_server.get(bucket, "from_parquet/_SUCCESS"))["rows"] == 2000
    assert json.loads(s3_server.get(bucket, "from_images/_SUCCESS"))["rows"] == 3
