"""``python -m fmnist train|score|evaluate|pipeline|tune ...``: the ``fmnist`` command."""

from fmnist.cli import run

run()
