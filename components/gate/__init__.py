"""The promotion gate (DESIGN 7): policy.py, step.py (run()), component.py; `cta gate` is
cta_cli/commands/gate.py."""
