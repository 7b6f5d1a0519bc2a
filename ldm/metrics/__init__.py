"""Sample metrics on pluggable features: Fréchet distance, KID, precision/recall, density/coverage, CLIP score,
and prompt following judged by the project's own classifiers.

`suite.py` puts them together (`build_suite`, config group conf/metrics/); one file per metric and per
feature network (`inception`, `dinov2`, `clip`, and `project_features` for the networks trained by
`python -m ldm.tools.train_features` and shipped in ldm/metrics/weights/); `reference.py` caches the
real data's statistics.
"""
