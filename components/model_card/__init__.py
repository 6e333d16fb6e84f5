"""Model cards of registered versions, rendered from the registry: card.py (`cta model-card`
is cta_cli/commands/model_card.py)."""
