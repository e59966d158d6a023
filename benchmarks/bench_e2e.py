"""End-to-end benchmark (the same as `parallelspec bench`); see parallelspec/bench.py."""
import sys

from parallelspec.tools.bench import main

if __name__ == "__main__":
    sys.exit(main())
