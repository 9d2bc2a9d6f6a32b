"""Helpers shared by the bench/<op>.py scripts (kept in a sub-package so `make bench` does not run them)."""
