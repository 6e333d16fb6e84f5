"""The register_model step (DESIGN 6.1): ``run()`` and ``complete_versions()`` in step.py."""
