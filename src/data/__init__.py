"""The data: data sets and their keywords (`datasets`), the released PIL transforms (`transforms`), the
batched on-device augmentation (`augment`), which images each process sees (`sampling`), and the
per-data-set constants (`constants`). Imports nothing from the rest of `src`."""
