"""fsledger: keeps a database of every file in directory trees true to disk."""

__version__ = "0.1.0"
"""The one place the version is written (pyproject.toml reads it; ``fsledger --version``
prints it without loading package metadata)."""
