"""Train Siamese-Diffusion: `python tutorial_train.py --config CFG [key=value ...]` (see --help)."""

import sys

from tools.train import main

if __name__ == "__main__":
    sys.exit(main())
