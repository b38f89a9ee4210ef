"""Hyperparameter search: training runs as Ray Tune trials, and the leaderboard."""
