"""For every test: torch keeps its own thread count in the runs (``"auto"`` would follow
the machine's load, and results that tests compare bit for bit could then differ with
what else runs beside the suite). tests/core/test_threads.py tests ``"auto"`` itself."""

import os

os.environ.setdefault("NAPARI_DISCREG_THREADS", "torch")
