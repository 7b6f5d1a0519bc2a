"""Developer tools: bench, sampler error table, streaming check, feature-net training; never imported by ldm."""
