"""``python -m train.kind`` (and ``torchrun ... -m train.kind``): the trainer's command line."""
import sys

from train.kind.trainer import main

sys.exit(main())
