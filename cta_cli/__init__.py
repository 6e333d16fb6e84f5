"""The `cta` command line: the top layer, above pipelines/, components/ and cta_model/.

Where a command lives (one rule):

- Every top-level command or command group ``cta NAME`` lives in ``cta_cli/commands/NAME.py``,
  named after the command with hyphens as underscores (``cta validate-data`` in
  ``commands/validate_data.py``, the group ``cta rollout`` and all its subcommands in
  ``commands/rollout.py``); ``cta_cli/main.py`` only adds them to the group.
- A command module parses flags, calls a step's ``run()`` (components/<step>/) or a library
  function, and prints the result; logic that a KFP component or a test could also use
  belongs in components/ or cta_model/, not here.
- Anything that starts a pipeline lives here (``cta pipeline run/submit/schedule``, and the
  launch half of ``cta retrain``, whose decision is components/retrain/step.py).

Nothing below this package imports it (`make lint` checks the layers with import-linter).
A component that needs a command in another process runs it by name: ``cta train`` in the
TrainJob's pods, ``python -m cta_cli train`` under torchrun, ``python -m cta_cli serve`` for
local line servers. README.md beside this file lists every command, its module and what it
calls.
"""
