"""Tests that run in one process (a one-rank gloo group at most)."""
