"""Tests of training-time DP (privacy/training, tools/train_dp.py); they need the training extra."""
