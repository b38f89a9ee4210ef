"""Torch on a second thread, as Ray Train V2 runs the training function: does it cost?

    python bench/bench_thread.py

Times the plain in-memory loop of bench_training.py (b), 2 torch threads, each case in a
fresh process: on the main thread; on a second thread; on a second thread after the main
thread has itself run torch (one epoch). Ray Train's worker runs the training function on
a second thread and no torch on its main thread: the second case.
"""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

CASES = {
    "main": "main thread",
    "thread": "second thread",
    "thread-after-main": "second thread, after torch on the main thread",
}


def run_case(case: str, epochs: int = 3) -> float:
    from bench_training import plain_loop

    if case == "main":
        return plain_loop(epochs)
    if case == "thread-after-main":
        plain_loop(1)
    result = []
    thread = threading.Thread(target=lambda: result.append(plain_loop(epochs)))
    thread.start()
    thread.join()
    return result[0]


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--case":
        print(run_case(sys.argv[2]))
        return
    print("| where the loop runs | s/epoch |")
    print("|---|---:|")
    for case, label in CASES.items():
        out = subprocess.run([sys.executable, __file__, "--case", case], capture_output=True, text=True, check=True)
        print(f"| {label} | {float(out.stdout.split()[-1]):.2f} |", flush=True)


if __name__ == "__main__":
    main()
