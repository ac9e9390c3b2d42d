"""The method: the ResNet with its projection head and prototypes (`resnet`), Un-Mix's image mixtures
and the SwAV loss with its queue (`unmix`), Sinkhorn-Knopp (`sinkhorn`), LARC around SGD (`larc`) and the
training iteration that owns the method's state (`train_step.UnmixSwAV`). Pure tensor arithmetic: it
imports nothing from the rest of `src`."""
