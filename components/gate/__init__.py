"""The promotion gate (DESIGN 7): policy.py, step.py (run()), cli.py, component.py."""
