"""xdiff_cli.models: see docs/ARCHITECTURE.md."""
