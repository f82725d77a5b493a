"""The stages of one registration (pre-alignment, network read-out, B-spline, MIND-SSC, warping) and what reads its result."""
