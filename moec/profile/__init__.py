"""Calibration data, routing statistics, evaluation and sensitivity of MoE experts."""
