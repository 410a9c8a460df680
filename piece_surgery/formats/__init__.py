"""The artifacts: mask files, delta folders, cards, merge recipes, and telling them apart."""
