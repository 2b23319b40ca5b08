"""Training: the job's loop, the loss, whole-volume validation, adversarial training and the metrics log."""
