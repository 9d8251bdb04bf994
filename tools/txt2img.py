"""Text-to-image: ``python tools/txt2img.py ...`` is ``latentdiff txt2img ...``.

The code lives in latentdiff/cli/txt2img.py; ``--help`` lists the options.
"""

import sys

from latentdiff.cli.main import run_tool

if __name__ == "__main__":
    sys.exit(run_tool("txt2img"))
