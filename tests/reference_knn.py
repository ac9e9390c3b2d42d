"""The weighted kNN classifier as a whole (predictions, top-1/top-5) on given features, built from
src/eval/knn.py's scores: what the tests compare the monitor (top-1 of the network's features) with."""
import torch

from src.eval.knn import knn_scores
from src.eval.metrics import correct_counts


@torch.no_grad()
def knn_classify(train_features, train_labels, test_features, num_classes, k=200, temperature=0.1,
                 batch_size=256):
    """Predicted label of every test sample (1-D LongTensor, N_test) by the weighted kNN vote."""
    scores = knn_scores(train_features, train_labels, test_features, num_classes, k, temperature, batch_size)
    return scores.argmax(dim=1)


@torch.no_grad()
def knn_accuracy(train_features, train_labels, test_features, test_labels, num_classes, k=200,
                 temperature=0.1, batch_size=256):
    """(top-1 %, top-5 %) of the weighted kNN classifier on the test features; top-5 is top-min(5, C)."""
    scores = knn_scores(train_features, train_labels, test_features, num_classes, k, temperature, batch_size)
    c1, c5 = correct_counts(scores, test_labels, (1, 5)).tolist()
    n = max(scores.shape[0], 1)
    return 100.0 * c1 / n, 100.0 * c5 / n
