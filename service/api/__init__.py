"""HTTP controllers: predict, models, health, management."""
