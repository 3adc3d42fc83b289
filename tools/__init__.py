"""Tooling of this repository (README tables, committed model cards): runs from a checkout, not installed."""
