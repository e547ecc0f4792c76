"""Per-sample sampling latency of the base U-ViT and DuoDiff for every solver and backend.

The project's main job. See ``duodiff_fast/bench/latency.py`` (also reachable as
``duodiff-fast bench``) for the options; results go to benchmarks/results/ as JSON.

    python benchmarks/latency.py --help
"""
import os
import sys

if __name__ == "__main__":
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    sys.path.insert(0, repo)  # run from a checkout even when the package is not installed
    from duodiff_fast.bench.latency import main

    main(sys.argv[1:] + ([] if any(a.startswith("--results-dir") for a in sys.argv[1:])
                         else ["--results-dir", os.path.join(repo, "benchmarks", "results")]))
