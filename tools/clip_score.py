"""CLIP score of image-caption pairs: ``python tools/clip_score.py ...`` is ``latentdiff clip-score ...``.

The code lives in latentdiff/cli/clip_score.py; ``--help`` lists the options.
"""

import sys

from latentdiff.cli.main import run_tool

if __name__ == "__main__":
    sys.exit(run_tool("clip-score"))
