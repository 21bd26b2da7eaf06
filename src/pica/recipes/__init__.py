"""Training and evaluation recipes for pica (placeholder; engineer A owns this file)."""
