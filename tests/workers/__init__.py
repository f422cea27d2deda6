"""Rank workers, launchers and shared helpers of the tests, importable by spawned processes."""
