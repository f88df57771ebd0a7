"""``python -m train.handbone`` (and ``torchrun ... -m train.handbone``): the trainer's command line."""
import sys

from train.handbone.trainer import main

sys.exit(main())
