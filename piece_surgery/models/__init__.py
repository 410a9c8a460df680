"""Checkpoints and loaded models: layouts, names, loading, parts, tiny models for tests."""
