"""Scar-severity trainer (photo, clinical and combined models) and the seed-checkpoint import:
``python -m train.scar``; see ``trainer``.
"""
