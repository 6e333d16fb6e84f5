"""The validate_data step (DESIGN 4.5): ``run()`` in step.py; the suite in expectations.py."""
