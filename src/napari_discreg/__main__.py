"""``python -m napari_discreg``: the ``napari-discreg`` command line."""

import sys

from .cli import main

sys.exit(main())
