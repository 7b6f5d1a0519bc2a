"""Evaluation of runs as one flow: `sources` (drawn samples, a sample file, real images), `seeded` (sample i from
seed (seed, i)), `suites` (the metric suite of a run's data set and its reference), `scoring` (the config resolved
once, one scoring loop), `record` (metrics.json, wandb), `table` (the sweep table and quality-vs-NFE curve)."""
