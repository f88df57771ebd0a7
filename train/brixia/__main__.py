"""``python -m train.brixia`` (and ``torchrun ... -m train.brixia``): the trainer's command line."""
import sys

from train.brixia.trainer import main

sys.exit(main())
