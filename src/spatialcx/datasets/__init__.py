"""Synthetic datasets made by code (nothing is downloaded)."""

from ._demo import demo
