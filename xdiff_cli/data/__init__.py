"""xdiff_cli.data: see docs/ARCHITECTURE.md."""
