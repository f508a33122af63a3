"""xdiff_cli.findings: see docs/ARCHITECTURE.md."""
