"""Convert checkpoints: ``python tools/convert_weights.py SRC OUT [--to-hf] [--dtype bf16] [--overwrite]``.

A thin entry point over :func:`dultra_jax.checkpoints.convert` (same as ``dultra convert``).
"""

import sys

from dultra_jax.cli import main

if __name__ == "__main__":
    sys.exit(main(["convert", *sys.argv[1:]]))
