"""Sample image-mask pairs: `python tutorial_inference.py --ckpt MERGED --masks DIR --out DIR` (see --help)."""

import sys

from tools.inference import main

if __name__ == "__main__":
    sys.exit(main())
