"""Datasets: the product's line-dataset format, the synthetic generator and the fleet inventory.

Submodules are imported explicitly (``from cta_model.data.lines import load_lines_config``) so
that reading ``lines.yaml`` does not pull in pyarrow or pandas.
"""
