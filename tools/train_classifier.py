"""Train the CIFAR-10 judging classifier:
``python tools/train_classifier.py ...`` is ``latentdiff train-classifier ...``.

The code lives in latentdiff/cli/train_classifier.py; ``--help`` lists the options.
"""

import sys

from latentdiff.cli.main import run_tool

if __name__ == "__main__":
    sys.exit(run_tool("train-classifier"))
