"""python workflows/serve.py --help  (the same as: fmnist serve)"""

import sys
from pathlib import Path

# Run from a checkout (or a Ray job's working dir) without installing the package.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fmnist.cli import workflow_main  # noqa: E402

if __name__ == "__main__":
    workflow_main("serve")
