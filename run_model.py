#!/usr/bin/env python
"""Entry point: ``python run_model.py weights/`` serves every model over stdin/stdout JSON lines.

Drop-in for the osteoporosis seed's run_model.py (``python run_model.py model.pth`` works too).
See ``python run_model.py --help`` and README.md for the protocol.
"""
import sys

from daemon.cli import main

if __name__ == "__main__":
    sys.exit(main())
