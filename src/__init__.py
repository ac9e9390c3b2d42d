"""Un-Mix + SwAV for CIFAR, in four layers: `method`, `data`, `runtime`, `eval` (docs/CONTRACTS.md)."""
