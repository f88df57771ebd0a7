"""``python -m train.scar`` (and ``torchrun ... -m train.scar``): the trainer's command line."""
import sys

from train.scar.trainer import main

sys.exit(main())
