"""Pure numpy/torch engine of napari-discreg: no Qt, no napari."""
