"""Evaluation: what the two evaluation scripts share (`setup`), the kNN monitor (`knn`), the linear probe
on cached features (`linear_probe`), reading pretrained weights (`pretrained`) and the labelled subsets of
semi-supervised fine-tuning (`subset`)."""
