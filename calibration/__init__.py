"""INT8 calibration data and caches, pseudo-anomalies for the gate, and the threshold rule artifacts ship with."""
