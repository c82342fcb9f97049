"""Evaluation: zero-shot classification (zeroshot.py)."""
