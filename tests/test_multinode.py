"""A real multi-node Ray cluster on one machine (ray.cluster_utils.Cluster): training and scoring."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pyarrow.parquet as pq

from conftest import REPO

# The head has no CPUs, so nothing but the driver's bookkeeping runs there; each training worker
# asks for 2 CPUs, so the 2 workers must sit on different worker nodes. The nodes share this
# machine's disk, so the test checks what separate disks would need: no Ray worker opens the data
# files (an audit hook in each refuses them: only the driver reads them), and scoring's tasks
# that read its inputs and write its output all ran on the driver's node (Ray's task records).
# A separate process: this test needs its own cluster, not the session's Ray instance.
SCRIPT = textwrap.dedent("""
    import os
    import sys
    import pyarrow as pa
    import pyarrow.parquet as pq
    import ray
    from PIL import Image
    from ray.cluster_utils import Cluster
    from ray.util.state import list_tasks
    sys.path.insert(0, {repo!r})
    from fmnist.cli import main
    from fmnist.data import load_test_split

    storage, data_dir = sys.argv[1], sys.argv[2]

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
    for input, output in (("test", "predictions"), (storage + "/test.parquet", "from_parquet"),
                          (storage + "/images", "from_images")):
        if code == 0:
            code = main(["score", "--checkpoint", storage + "/multi", "--input", input,
                         "--output", os.path.join(storage, output), "--concurrency", "2", "--data-dir", data_dir])

    file_tasks = {{(t.name, t.node_id == cluster.head_node.node_id) for t in list_tasks(detail=True, limit=10_000)
                  if t.type == "NORMAL_TASK" and t.name.startswith(("Read", "Write", "MapBatches"))
                  and t.node_id is not None}}  # a record can lag behind its task: no node yet
    print("scoring's file tasks (name, on the driver's node):", sorted(file_tasks))
    ray.shutdown()
    cluster.shutdown()
    sys.exit(code or file_tasks != {{("Read_ParquetRowGroups", True), ("Write", True),
                                     ("MapBatches(_decode_image_files)", True)}})
""")


def test_training_and_scoring_on_a_three_node_cluster(real_data_dir, tmp_path):
    run = subprocess.run([sys.executable, "-c", SCRIPT.format(repo=str(REPO)), str(tmp_path), str(real_data_dir)],
                         capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout + run.stderr
    assert (tmp_path / "multi" / "history.csv").read_text().count("\n") == 2
    assert pq.read_table(tmp_path / "predictions").num_rows == 10_000
    assert pq.read_table(tmp_path / "from_parquet").num_rows == 10_000
    assert pq.read_table(tmp_path / "from_images").num_rows == 3
