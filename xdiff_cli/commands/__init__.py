"""One module per command group; each exposes `register(app)`. Keep heavy imports inside bodies."""
