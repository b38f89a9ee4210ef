"""A real multi-node Ray cluster on one machine (ray.cluster_utils.Cluster): training and scoring."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pyarrow.parquet as pq

from conftest import REPO

# The head has no CPUs, so nothing but the driver's bookkeeping runs there; each training worker
# asks for 2 CPUs, so the 2 workers must sit on different worker nodes. Only the driver may read
# the data files: an audit hook in every Ray worker process refuses to open them. A separate
# process: this test needs its own cluster, not the session's Ray instance.
SCRIPT = textwrap.dedent("""
    import os
    import sys
    import ray
    from ray.cluster_utils import Cluster
    sys.path.insert(0, {repo!r})
    from fmnist.cli import main

    storage, data_dir = sys.argv[1], sys.argv[2]

    def forbid_the_data_files(data_dir=data_dir):  # in every Ray worker process of this job
        def refuse(event, args):
            if event == "open" and str(args[0]).startswith(data_dir):
                raise PermissionError(f"a Ray worker opened {{args[0]}}")
        sys.addaudithook(refuse)

    cluster = Cluster(initialize_head=True, head_node_args={{"num_cpus": 0}})
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

    code = main(["train", "--epochs", "1", "--num-workers", "2", "--cpus-per-worker", "2",
                 "--storage-path", storage, "--name", "multi", "--data-dir", data_dir])
    if code == 0:
        code = main(["score", "--checkpoint", storage + "/multi", "--output", storage + "/predictions",
                     "--concurrency", "2", "--data-dir", data_dir])
    ray.shutdown()
    cluster.shutdown()
    sys.exit(code)
""")


def test_training_and_scoring_on_a_three_node_cluster(real_data_dir, tmp_path):
    run = subprocess.run([sys.executable, "-c", SCRIPT.format(repo=str(REPO)), str(tmp_path), str(real_data_dir)],
                         capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout + run.stderr
    assert (tmp_path / "multi" / "history.csv").read_text().count("\n") == 2
    assert pq.read_table(tmp_path / "predictions").num_rows == 10_000
