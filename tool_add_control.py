"""Build the initial ControlNet checkpoint from SD1.5 weights (one file or a diffusers folder):
`python tool_add_control.py SD_CKPT OUT` (see --help; docs/sd15_weights.md)."""

import sys

from tools.add_control import main

if __name__ == "__main__":
    sys.exit(main())
