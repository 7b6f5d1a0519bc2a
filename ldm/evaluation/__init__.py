"""Evaluation of runs: `draw` (sample i from seed (seed, i)), `predict` (sampling and scoring through
`trainer.predict`), `suites` (the metric suite of a run's data set and its reference), `scoring` (what
`evaluate.py` scores), `record` (metrics.json, wandb), `table` (the sweep table and quality-vs-NFE curve), `checks`.
`digits` and `shapes` are the data sets' own checks of a sample file (`python -m ldm.evaluate FILE.npz`)."""
