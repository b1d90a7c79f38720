"""Default key names used across stimg (the storage contract, DESIGN.md §2)."""

TABLE_KEY = "table"
REGION_KEY = "region"
INSTANCE_KEY = "spot_id"
LIBRARY_KEY = "library_id"
SPATIAL_KEY = "spatial"
TISSUE_KEY = "tissue_coverage"
TARGET_KEY = "si_target"
PRED_LAYER = "si_pred"
ALEATORIC_LAYER = "si_aleatoric"
EPISTEMIC_LAYER = "si_epistemic"
UNCERTAINTY_OBS = "si_uncertainty"
SAMPLED_OBS = "si_sampled"
SAMPLE_ROUND_OBS = "si_sample_round"
EVAL_UNS = "si_eval"

ST_SPOT_DIAMETER_UM = 100.0
ST_SPOT_PITCH_UM = 200.0
VISIUM_SPOT_DIAMETER_UM = 55.0
VISIUM_SPOT_PITCH_UM = 100.0
