"""Evaluation: accuracy and classification reports from Parquet predictions (no Ray)."""
