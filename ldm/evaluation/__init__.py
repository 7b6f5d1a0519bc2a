"""Sample metrics, one file per evaluation: `digits` (a classifier's agreement with the asked label),
`shapes` (color and position judged from pixels). `python -m ldm.evaluate FILE.npz` picks one."""
