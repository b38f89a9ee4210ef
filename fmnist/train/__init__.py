"""Training: the MLP trained data-parallel on Ray Train (or in local mode), into a run directory."""
