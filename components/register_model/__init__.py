"""The register_model step (DESIGN 6.1): ``run()`` in step.py."""
