"""Engines: per-rank files (format.py), building them (build.py), running them (session.py)."""
