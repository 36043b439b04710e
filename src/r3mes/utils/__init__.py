"""Small shared helpers: the data directory and crash-safe writes."""
