"""The GPU check's figures, from run.sh's step outputs: printed, and written to OUT/summary.json.

    python bench/gpu_check/summary.py WORK OUT GPU_FLAG

Reads WORK/wall_seconds.txt (each step's wall time), WORK/STEP.out (its output), WORK/STEP.stamped
(its output, each line with the seconds since the step started), WORK/STEP.gpu_mib (GPU memory in
use every 0.2 s, from nvidia-smi) and OUT/history.csv (training's per-epoch figures). A step that
failed or did not run is left out.
"""

from __future__ import annotations

import csv
import json
import re
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_process import EPOCH_ROW  # noqa: E402  (training's table rows, as that benchmark reads them)

SCORED = re.compile(r"Scored ([\d,]+) images in ([\d.]+) s \(([\d,]+) images/s\)")


def training(out: Path, work: Path, wall: dict[str, float]) -> dict:
    rows = list(csv.DictReader(open(out / "history.csv")))
    later = rows[1:] or rows  # epoch 1 includes the warm-up (CUDA context, first kernels)

    def mean(name: str, rs: list[dict]) -> float:
        return statistics.mean(float(r[name]) for r in rs)

    stamped = [line.split(" ", 1) for line in open(work / "train.stamped")]
    header = next(float(t) for t, line in stamped if line.startswith("Training "))
    epochs = [float(t) for t, line in stamped if EPOCH_ROW.match(line)]
    return {
        "epochs": len(rows),
        "train_seconds_per_epoch": mean("train_seconds", rows),
        "epoch_seconds_per_epoch": mean("epoch_seconds", rows),
        "train_seconds_per_epoch_2on": mean("train_seconds", later),
        "epoch_seconds_per_epoch_2on": mean("epoch_seconds", later),
        "samples_per_second_2on": mean("samples_per_second", later),
        "test_accuracy": float(rows[-1]["test_accuracy"]),
        "train_command_seconds": wall["train"],
        "process_to_header_seconds": header,
        "process_to_first_epoch_seconds": epochs[0],
        "last_epoch_to_exit_seconds": wall["train"] - epochs[-1],
    }


def scoring(work: Path, step: str, wall: dict[str, float]) -> dict:
    scored = SCORED.search(open(work / f"{step}.out").read())
    return {"images": int(scored[1].replace(",", "")), "job_seconds": float(scored[2]),
            "images_per_second": int(scored[3].replace(",", "")), "command_seconds": wall[step],
            "images_per_second_whole_command": int(scored[1].replace(",", "")) / wall[step]}


def main() -> None:
    work, out, gpu_flag = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
    wall = {name: float(s) for name, s in (line.split() for line in open(work / "wall_seconds.txt"))}
    ran = {name for name in wall if (work / f"{name}.out").exists()}
    failed = [line.split()[1] for line in open(work / "failed.txt")] if (work / "failed.txt").exists() else []
    s: dict = {"device": gpu_flag, "failed_steps": failed}
    if "train" not in failed:
        s["train"] = training(out, work, wall)
    for step in ("score", "pipeline", "score_1m", "score_1m_b8192"):
        if step in ran and step not in failed:
            s[step] = scoring(work, step, wall)
    if "pipeline" in s:  # which device the README's main command chose, as its header says
        s["pipeline"]["header"] = next(line.strip() for line in open(work / "pipeline.out") if line.startswith("Training "))
    if (out / "evaluation.json").exists():
        s["evaluation_accuracy"] = json.load(open(out / "evaluation.json"))["accuracy"]
    for step in ("agree", "model_step"):
        if step in ran:
            s[step] = [line.rstrip() for line in open(work / f"{step}.out") if line.strip()]
    s["gpu_memory_peak_mib"] = {
        name: max(map(int, values)) for name in sorted(ran)
        if (values := (work / f"{name}.gpu_mib").read_text().split() if (work / f"{name}.gpu_mib").exists() else [])
    }
    json.dump(s, open(out / "summary.json", "w"), indent=2)

    print(f"\nSUMMARY ({gpu_flag}); also in summary.json; failed steps: {', '.join(failed) or 'none'}")
    if "train" in s:
        t = s["train"]
        print(f"train:    {t['epochs']} epochs; per epoch {t['train_seconds_per_epoch']:.3f} s train_seconds, "
              f"{t['epoch_seconds_per_epoch']:.3f} s epoch_seconds (epochs 2+: {t['train_seconds_per_epoch_2on']:.3f} s, "
              f"{t['epoch_seconds_per_epoch_2on']:.3f} s, {t['samples_per_second_2on']:,.0f} samples/s); "
              f"test accuracy {t['test_accuracy']:.4f}")
        print(f"          process {t['train_command_seconds']:.1f} s: to the header {t['process_to_header_seconds']:.1f} s, "
              f"to the first epoch {t['process_to_first_epoch_seconds']:.1f} s, "
              f"last epoch to exit {t['last_epoch_to_exit_seconds']:.1f} s")
    if "pipeline" in s:
        p = s["pipeline"]
        print(f"pipeline: {p['header']}\n          command {p['command_seconds']:.1f} s; scored "
              f"{p['images']:,} images at {p['images_per_second']:,} images/s ({p['job_seconds']:.1f} s)")
    for step in ("score", "score_1m", "score_1m_b8192"):
        if step in s:
            c = s[step]
            print(f"{step + ':':<15} {c['images']:,} images at {c['images_per_second']:,} images/s over the Ray Data job "
                  f"({c['job_seconds']:.1f} s); command {c['command_seconds']:.1f} s with Ray's start "
                  f"({c['images_per_second_whole_command']:,.0f} images/s)")
    if "evaluation_accuracy" in s:
        print(f"evaluate: accuracy {s['evaluation_accuracy']:.4f}")
    for step in ("agree", "model_step"):
        for line in s.get(step, []):
            print(f"{step}: {line}")
    if s["gpu_memory_peak_mib"]:
        print("GPU memory in use, peak per step (MiB): "
              + ", ".join(f"{k} {v:,}" for k, v in s["gpu_memory_peak_mib"].items()))


if __name__ == "__main__":
    main()
