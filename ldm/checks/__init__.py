"""Every config check, run once before any work, and the Hydra callbacks that run them."""
