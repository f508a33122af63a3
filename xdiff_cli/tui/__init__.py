"""`xdiff browse`: a Textual TUI over the same library the CLI uses (runs, FeatureIndex, Steerer)."""
