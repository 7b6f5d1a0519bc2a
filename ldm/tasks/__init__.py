"""The LightningModules a run trains (diffusion, autoencoder) and their optimizer."""
