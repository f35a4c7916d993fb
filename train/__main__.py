"""deepspeed launcher entry: `deepspeed --num_gpus N --module latentforge.train --config FILE [overrides]`."""

import sys

from .trainer import main

sys.exit(main())
