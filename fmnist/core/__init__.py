"""What every stage shares: the data, the model, checkpoints, configs, run layout, storage and Ray start-up."""
