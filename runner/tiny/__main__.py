"""`python -m runner.tiny [DIR]`: rebuild the tiny BLIP-2 (default: the shipped artifact folder)."""

import logging
import sys
from pathlib import Path

from runner.tiny import ARTIFACT
from runner.tiny.recipe import build_tiny_blip2

logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
build_tiny_blip2(Path(sys.argv[1]) if len(sys.argv) > 1 else ARTIFACT)
