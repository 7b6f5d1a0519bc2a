"""The bodies of the commands: train, sample, evaluate, export."""
