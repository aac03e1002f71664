"""Ours vs transformers on one checkpoint: load, prefill tok/s, decode ms/step, memory floor.

    python benchmarks/model_bench.py --model models/tiny_starcoder_py

Makes the tiny_starcoder_py preset with random weights first if --model names no directory
(timing does not depend on weight values). Same as `starcoder-lsp bench`.
"""

from __future__ import annotations

import sys
from pathlib import Path

from starcoder_lsp.cli import main

if __name__ == "__main__":
    argv = sys.argv[1:]
    if "--model" not in argv:
        default = Path("models/tiny_starcoder_py")
        if not default.is_dir():
            main(["make-random-model", str(default), "--preset", "tiny_starcoder_py"])
        argv += ["--model", str(default)]
    sys.exit(main(["bench", *argv]))
