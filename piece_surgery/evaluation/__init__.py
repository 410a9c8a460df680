"""Token losses, and what a candidate changed against its base on a dataset."""
