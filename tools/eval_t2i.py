"""Text-to-image benchmark: FID, CLIP score, class accuracy:
``python tools/eval_t2i.py ...`` is ``latentdiff eval-t2i ...``.

The code lives in latentdiff/cli/eval_t2i.py; ``--help`` lists the options.
"""

import sys

from latentdiff.cli.main import run_tool

if __name__ == "__main__":
    sys.exit(run_tool("eval-t2i"))
