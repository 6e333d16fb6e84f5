"""``python -m components.serve ...`` runs ``cta serve`` (what start_server launches)."""

from components.serve.cli import serve

if __name__ == "__main__":
    serve(prog_name="cta serve")
