"""The train step: the trainer run with MLflow tracking and the logged model."""
