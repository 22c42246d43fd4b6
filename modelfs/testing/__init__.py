"""Test and demo helpers that ship with the package (the origin fixture)."""
