"""Train a model from a YAML config (also under torchrun): ``python tools/train.py ...`` is ``latentdiff train ...``.

The code lives in latentdiff/cli/train.py; ``--help`` lists the options.
"""

import sys

from latentdiff.cli.main import run_tool

if __name__ == "__main__":
    sys.exit(run_tool("train"))
