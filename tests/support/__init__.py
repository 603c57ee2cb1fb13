"""Helpers shared by the test suites (not fixtures: plain, importable code)."""
