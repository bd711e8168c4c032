"""Grafting workers and the engine they run."""
