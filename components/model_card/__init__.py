"""Model cards of registered versions, rendered from the registry: card.py, cli.py."""
