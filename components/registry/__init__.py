"""The MLflow registry rules in one place: names.py (aliases, tags, artefact paths), client.py
(tracking URI and the one client factory), versions.py, models.py, attachments.py, records.py."""
