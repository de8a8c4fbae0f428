"""Convert a training checkpoint (ZeRO shards) to one fp32 file: `python zero_to_fp32.py CKPT OUT` (see --help)."""

import sys

from tools.zero_to_fp32 import main

if __name__ == "__main__":
    sys.exit(main())
