"""What the parts agree on: the Conditioning, the batch keys, the autoencoder and denoiser contracts."""
