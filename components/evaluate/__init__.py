"""The evaluate step (DESIGN 5.1, 6.1): ``run()`` in step.py writes ``evaluation.json``."""
