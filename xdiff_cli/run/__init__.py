"""xdiff_cli.run: see docs/ARCHITECTURE.md."""
