"""The package's version, in a module of its own: every layer may record it (stores, runs, reports)
without importing the package's root, which offers the Python API and so sits above them all."""

__version__ = "0.1.0"
