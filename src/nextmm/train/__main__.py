"""`python -m nextmm.train ...`, and so `torchrun --nproc_per_node N -m nextmm.train ...`: `nextmm train ...`."""

import sys

from nextmm.cli import main

sys.exit(main(["train", *sys.argv[1:]]))
