"""A run: built from its config, loaded from its directory (trusted targets only), its presets, loggers and ranks."""
