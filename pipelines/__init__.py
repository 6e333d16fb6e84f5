"""Pipeline definitions: they only wire the components (DESIGN 2)."""
