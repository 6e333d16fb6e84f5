"""Staged roll-out of a registered model version to production lines (DESIGN 7)."""
