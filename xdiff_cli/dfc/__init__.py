"""xdiff_cli.dfc: see docs/ARCHITECTURE.md."""
