"""Training: the LightningModule, optimizers and schedules, regularizers, callbacks."""
