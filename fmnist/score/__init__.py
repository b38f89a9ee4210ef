"""Batch scoring: a checkpoint scores images into Parquet predictions with Ray Data."""
