"""First stages: the KL-VAE, pixel identity and published VAEs."""
