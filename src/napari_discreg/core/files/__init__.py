"""Files: image and field readers and writers, ITK fields, checkpoints, resumable states, and outputs written as one transaction."""
