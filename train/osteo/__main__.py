"""``python -m train.osteo`` (and ``torchrun ... -m train.osteo``): the trainer's command line."""
import sys

from train.osteo.trainer import main

sys.exit(main())
