"""The leaf layer (files, checkpoint files, randomness, images, errors, environment): imports nothing of the project."""
