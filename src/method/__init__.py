"""The method: the ResNet with its projection head and prototypes (`resnet`), Un-Mix's image mixtures
(`unmix`), the SwAV loss with its queue and the method's hyper-parameters (`swav`), Sinkhorn-Knopp
(`sinkhorn`), LARC around SGD (`larc`), and the training iteration with the state it owns
(`train_step.UnmixSwAV`): its numbers, named device tensors staged ahead (`staging`), the non-finite guard's undo
(`guard`) and whole-iteration CUDA graphs (`cuda_graph`). Tensor arithmetic; it imports nothing from the
rest of `src`."""
