"""Entrypoints for Ray job submission and for scheduled and reprocessing runs (see README, "On a cluster")."""
