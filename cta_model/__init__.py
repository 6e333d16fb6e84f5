"""The CTAL model library: tasks, networks, losses, metrics, data and training.

It never imports an MLOps package (kfp, mlflow, boto3, great_expectations, kubernetes);
remote files reach it through openers passed in by the components.
"""

__version__ = "0.1.0"
