"""The monitoring phase: drift, the training reference, quality, OOD, feedback, the review queue, alerts."""
