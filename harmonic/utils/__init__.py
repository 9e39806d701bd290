"""Helpers every part of the package uses: argument checks, atomic result files, provenance."""
