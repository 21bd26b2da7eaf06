"""Task formats for the pica recipes (placeholder; engineer A owns the registry in this file)."""
