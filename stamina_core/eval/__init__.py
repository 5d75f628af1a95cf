"""Evaluation: the benchmark judge, KID/MMD, the continual R[t, i] matrix and its summaries, plots."""
