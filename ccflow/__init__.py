"""ccflow: count cells in fluorescence microscopy images.

Trains a segmentation network with Ray Train, tracks experiments and model versions in
MLflow, and counts cells over folders of images with overlays that explain each count.
"""

__version__ = "0.1.0"

REGISTERED_MODEL_NAME = "ccflow-cell-counter"

# Registry aliases. Jobs and serving use the champion by default. New candidates are
# registered as the challenger and reach champion only through `ccflow promote` or the UI.
CHAMPION_ALIAS = "champion"
CHALLENGER_ALIAS = "challenger"

# Promotion gate defaults: a candidate may lose at most this much detection F1 (F1 units)
# and gain at most this much count MAPE (percentage points) against the champion.
DEFAULT_TOLERANCE_F1 = 0.02
DEFAULT_TOLERANCE_MAPE = 2.0
