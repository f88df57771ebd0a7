"""Synthetic phantom generators, one module per task (``train.phantoms.osteo`` ...), behind ``train.synthetic``."""
