"""`make bench`: the benchmarks whose figures benchmarks/RESULTS.md reports (about an hour on 2 cores).

Each writes JSON under benchmarks/results/; run them one at a time on an otherwise idle machine.
"""

from __future__ import annotations

import subprocess
import sys

RUNS = [
    ["-m", "benchmarks.train_speed"],
    ["-m", "benchmarks.tokenizer", "--dataset", "scientific"],
    ["-m", "benchmarks.decode_speed", "--beams", "20", "200", "--hf-dtypes", "float32", "bfloat16"],
    ["-m", "benchmarks.trie_layout"],
    ["-m", "benchmarks.sasrec_baseline"],
]


def main() -> None:
    for args in RUNS:
        print("+ python", " ".join(args), flush=True)
        subprocess.run([sys.executable, *args], check=True)


if __name__ == "__main__":
    main()
