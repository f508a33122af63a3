"""Widgets the screens compose: feature table, feature detail, shaded examples, stream panes."""
