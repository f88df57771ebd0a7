"""The shared training machinery every task trainer builds on: the k-fold loop (``loop``), DDP set-up
(``distributed``), fold splits (``folds``), metrics, losses, reporting (CSV, plots, card provenance) and the
preprocessing cache.
"""
