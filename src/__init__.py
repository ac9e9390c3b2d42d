"""Un-Mix + SwAV for CIFAR: one concept per module (see README)."""
