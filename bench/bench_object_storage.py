"""Scoring S3 -> S3 (a local moto server) against the same job local -> local.

    python bench/bench_object_storage.py [--rows 100000] [--batch-size 1024] [--concurrency 2]

Input: the 10,000 test images repeated to --rows rows, one Parquet file with a row group per
10,000 (bench_scoring's input), on local disk and as an object on a moto S3 server on
127.0.0.1 (started in this process; its memory is not counted). Each job is
``workflows/score.py`` as a whole process, Python start to exit, and its peak memory the PSS of
the process tree (see bench_scoring). Read tasks: those that fmnist.core.inputs.open_input plans
(Ray Data runs one per ReadTask it is given); write tasks: Ray Data's own stats of the run
(enable_auto_log_stats, which summarise the last operator only).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import boto3
import psutil
from moto.server import ThreadedMotoServer

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from bench_scoring import tree_pss, write_input  # noqa: E402
from fmnist.core.checkpoints import save_checkpoint  # noqa: E402
from fmnist.core.inputs import open_input  # noqa: E402
from fmnist.core.model import CLASS_NAMES, Classifier, ModelConfig  # noqa: E402

# workflows/score.py, with Ray Data's stats summary logged (on the console: --verbose).
SCORE = ("import sys, ray.data; ray.data.DataContext.get_current().enable_auto_log_stats = True; "
         "from fmnist.cli import main; sys.exit(main(['score', *sys.argv[1:], '--verbose']))")


def run(options: list[str], env: dict) -> tuple[float, int, dict[str, int]]:
    """Wall seconds, peak PSS and {operator: tasks} of one scoring process."""
    with tempfile.TemporaryFile() as log:
        start = time.monotonic()
        process = psutil.Popen([sys.executable, "-c", SCORE, *options], stdout=log, stderr=subprocess.STDOUT,
                               env=env, cwd=REPO)
        peak = 0
        while process.poll() is None:
            peak = max(peak, tree_pss(process))
            time.sleep(0.2)
        seconds = time.monotonic() - start
        log.seek(0)
        text = log.read().decode(errors="replace")
    if process.returncode != 0:
        sys.exit(f"scoring failed:\n{text[-3000:]}")
    tasks = {name: int(n) for name, n in re.findall(r"Operator \d+ (\S+): (\d+) tasks executed", text)}
    return seconds, peak, tasks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--concurrency", type=int, default=2)
    args = parser.parse_args()

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # a line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    s3_env = {"AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "bench",
              "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}
    s3 = boto3.client("s3", endpoint_url=s3_env["AWS_ENDPOINT_URL"], region_name="us-east-1",
                      aws_access_key_id="bench", aws_secret_access_key="bench")
    s3.create_bucket(Bucket="bench")
    os.environ.update(s3_env)  # for open_input here, and the jobs
    env = dict(os.environ)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        checkpoint = tmp / "checkpoint"  # throughput does not depend on the weights
        save_checkpoint(checkpoint, Classifier(), ModelConfig(), {"epoch": 0, "test_accuracy": 0.0}, {})
        source = tmp / "input.parquet"
        write_input(source, args.rows)
        s3.upload_file(str(source), "bench", "input/input.parquet")
        common = ["--checkpoint", str(checkpoint), "--batch-size", str(args.batch_size),
                  "--concurrency", str(args.concurrency)]
        jobs = {"local -> local": ["--input", str(source), "--output", str(tmp / "predictions")],
                "S3 -> S3": ["--input", "s3://bench/input", "--output", "s3://bench/predictions"]}
        print(f"{args.rows:,} rows, batch {args.batch_size}, --concurrency {args.concurrency} (CPUs)\n")
        print("| job | seconds | images/s | peak memory (PSS) | Ray Data tasks |")
        print("|---|---:|---:|---:|---|")
        throughput = {}
        for name, options in jobs.items():
            seconds, peak, tasks = run([*common, *options], env)
            throughput[name] = args.rows / seconds
            tasks = {"Read_ParquetRowGroups": len(open_input(options[1], None, CLASS_NAMES).read_tasks), **tasks}
            counts = ", ".join(f"{op} {n}" for op, n in tasks.items())
            print(f"| {name} | {seconds:.1f} | {throughput[name]:,.0f} | {peak / 2**20:,.0f} MiB | {counts} |",
                  flush=True)
        manifest = json.loads(s3.get_object(Bucket="bench", Key="predictions/_SUCCESS")["Body"].read())
        assert manifest["rows"] == args.rows, manifest
        print(f"\nS3 / local throughput: {throughput['S3 -> S3'] / throughput['local -> local']:.2f}x")
    server.stop()


if __name__ == "__main__":
    main()
