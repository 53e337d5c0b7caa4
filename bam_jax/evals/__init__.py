"""Evaluations of a pretrained backbone: kNN, the linear probe, and pictures of a run."""
