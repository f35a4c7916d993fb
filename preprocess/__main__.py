"""torchrun entry: `torchrun --nproc_per_node N -m latentforge.preprocess --config FILE [overrides]`."""

import sys

from .job import main

sys.exit(main())
