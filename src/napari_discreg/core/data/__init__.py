"""Training data: the MNI template's synthetic pairs (template) and the user's own folders (folders)."""
