"""Monitors of a pretraining run and of its checkpoints: online probe, feature
diagnostics, kNN and fast linear evaluation."""
