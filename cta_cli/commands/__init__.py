"""One module per top-level `cta` command, named after it (see cta_cli/__init__.py)."""
