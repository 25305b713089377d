"""``spark-submit stages/steps/reduce.py ...``: the reduce stage as an EMR step runs it.

A thin file: the stage's module is imported once (as ``stages.reduce.full``), never run as
``__main__`` beside its own import.
"""

import sys
from pathlib import Path

if not __package__:  # run as a file: the project (or its installed copy) must import
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from stages.cli import main

if __name__ == "__main__":
    sys.exit(main(["reduce", *sys.argv[1:]]))
