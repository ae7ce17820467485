"""Evaluation data and tools for distilled students (procedural datasets, scoring)."""
