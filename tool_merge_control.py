"""Merge trained weights into an inference checkpoint: `python tool_merge_control.py --help`."""

import sys

from tools.merge_control import main

if __name__ == "__main__":
    sys.exit(main())
