"""Pieces of the one-command benchmark (``python -m bench``)."""
