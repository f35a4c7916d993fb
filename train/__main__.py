"""deepspeed launcher entry: `deepspeed --num_gpus N --module latentforge.train --config FILE [overrides]`."""

import sys

from latentforge.shared.cli import main

# The deepspeed launcher appends --local_rank=N; LOCAL_RANK in the environment already says the same.
argv = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
sys.exit(main(["train", *argv]))
