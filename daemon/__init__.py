"""Serving: the stdin/stdout JSON protocol, request loop, model registry, explanations and outputs."""

__version__ = "0.1.0"
