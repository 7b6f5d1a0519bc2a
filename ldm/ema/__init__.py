"""`python -m ldm.ema run=DIR sigma_rel=S`: the post-hoc EMA entry point (the work is in ldm/commands/ema.py)."""
