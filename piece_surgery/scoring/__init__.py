"""Importance estimation and selection: the methods, the gradient pass, retain data."""
