"""Why Ray Train's 1 worker trails a plain loop here: torch in a non-main thread.

    python bench/bench_thread.py

Ray Train V2 runs the training function in a thread of the worker process. This times the
plain in-memory loop of bench_training.py (b) on the main thread and on a second thread,
with 1 and 2 torch threads, in one process without Ray.
"""

from __future__ import annotations

import sys
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from bench_training import plain_loop  # noqa: E402


def on_thread(torch_threads: int, epochs: int = 2) -> float:
    result = []

    def run():
        torch.set_num_threads(torch_threads)
        result.append(plain_loop(epochs))

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    return result[0]


def main() -> None:
    print("| torch threads | main thread s/epoch | other thread s/epoch |")
    print("|---:|---:|---:|")
    for torch_threads in (1, 2):
        torch.set_num_threads(torch_threads)
        main_thread = plain_loop(2)
        print(f"| {torch_threads} | {main_thread:.2f} | {on_thread(torch_threads):.2f} |", flush=True)


if __name__ == "__main__":
    main()
