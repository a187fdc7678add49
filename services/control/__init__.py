"""The retraining scheduler process (`rankloop schedule`): when to train, one run at a time, and the
model event that tells serving workers to swap."""
