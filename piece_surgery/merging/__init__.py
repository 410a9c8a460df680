"""Deltas merged into checkpoint folders and live models, and switched on a live model."""
