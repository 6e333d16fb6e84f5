"""`cta serve`: one model behind an HTTP API for a production line (see README.md)."""
