"""INT8 calibration data, caches, score normalisation and thresholds. Arrives with the INT8 issue."""
