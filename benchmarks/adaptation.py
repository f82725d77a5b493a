"""Adaptation benchmark: identity, source-only, MCD-L1/SWD/pEMD, oracle, elastix, SimpleITK.

    python benchmarks/adaptation.py            # full: 100 test pairs, 3 seeds
    python benchmarks/adaptation.py --quick    # CI-sized run of the same code path

Writes the "adaptation" section of docs/benchmarks.md, docs/benchmarks.json and
docs/images/benchmark_adaptation.png (``--out-dir`` elsewhere for quick runs).
"""

from napari_discreg.cli import main

if __name__ == "__main__":
    import sys

    raise SystemExit(main(["benchmark", *sys.argv[1:]]))
