"""xdiff: diff two LLMs of different architectures with Dedicated Feature Crosscoders."""

__version__ = "0.1.0"
