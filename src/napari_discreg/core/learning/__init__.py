"""The model, its training and its adaptation (self-training, MCD and the discrepancies), evaluation and distributed runs."""
