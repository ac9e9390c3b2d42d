"""Weighted kNN monitor: known answers, clusters, RNG untouched, 1 vs 2 processes (gloo)."""
import math
import os
import random
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))

from src.eval.knn import extract_features, knn_monitor, knn_scores  # noqa: E402
from tests.golden import entries_mismatch  # noqa: E402
from tests.reference_knn import knn_accuracy, knn_classify  # noqa: E402

# The children of test_one_and_two_processes_agree run with one thread: the same kernels here.
THREADS = 1


def _hand_case():
    s = math.sqrt(1 - 0.7 ** 2)
    train = torch.tensor([[1.0, 0.0], [0.7, s], [0.7, -s], [-1.0, 0.0]])
    labels = torch.tensor([0, 1, 1, 2])
    query = torch.tensor([[1.0, 0.0]])
    return train, labels, query


def test_hand_computed_scores_k3():
    train, labels, query = _hand_case()
    # neighbours: sample 0 (sim 1.0, class 0), samples 1 and 2 (sim 0.7, class 1)
    for t in (0.1, 1.0):
        scores = knn_scores(train, labels, query, num_classes=3, k=3, temperature=t)
        expected = torch.tensor([[math.exp(1.0 / t), 2 * math.exp(0.7 / t), 0.0]])
        torch.testing.assert_close(scores, expected, rtol=1e-5, atol=1e-5)
    # the weights decide: one very close neighbour beats two farther ones at T=0.1, not at T=1
    assert knn_classify(train, labels, query, 3, k=3, temperature=0.1).tolist() == [0]
    assert knn_classify(train, labels, query, 3, k=3, temperature=1.0).tolist() == [1]


def test_hand_computed_scores_k2_and_unnormalised_input():
    train, labels, query = _hand_case()
    # features are L2-normalised inside: scaling them changes nothing
    scores = knn_scores(3.0 * train, labels, 0.5 * query, num_classes=3, k=2, temperature=0.1)
    torch.testing.assert_close(scores, torch.tensor([[math.exp(10.0), math.exp(7.0), 0.0]]), rtol=1e-5, atol=1e-5)
    top1, top5 = knn_accuracy(train, labels, query, torch.tensor([1]), 3, k=2, temperature=0.1)
    assert top1 == 0.0 and top5 == 100.0   # 3 classes: "top-5" is top-3
    # k larger than the training set is clamped
    assert knn_classify(train, labels, query, 3, k=200).tolist() == [0]


def test_clusters_reach_100_percent():
    g = torch.Generator().manual_seed(0)
    c, d = 6, 32
    centres = torch.nn.functional.normalize(torch.randn(c, d, generator=g), dim=1)
    ytr, yte = torch.arange(300) % c, torch.arange(120) % c
    xtr = centres[ytr] + 0.05 * torch.randn(300, d, generator=g)
    xte = centres[yte] + 0.05 * torch.randn(120, d, generator=g)
    top1, top5 = knn_accuracy(xtr, ytr, xte, yte, c, k=20, temperature=0.1)
    assert top1 == 100.0 and top5 == 100.0
    pred = knn_classify(xtr, ytr, xte, c, k=20, batch_size=7)   # batching does not matter
    assert torch.equal(pred, yte)


def _tiny_model():
    g = torch.Generator().manual_seed(3)
    m = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
                            torch.nn.Dropout(0.5))
    with torch.no_grad():
        m[0].weight.copy_(torch.randn(m[0].weight.shape, generator=g))
    return m.eval()


def test_extract_features_normalised_pooled_and_rng_untouched():
    model = _tiny_model()
    imgs = torch.randn(11, 3, 6, 6, generator=torch.Generator().manual_seed(5))
    torch.manual_seed(123)
    np.random.seed(123)
    random.seed(123)
    t_state, np_state, py_state = torch.get_rng_state(), np.random.get_state(), random.getstate()

    feats = extract_features(model, imgs, batch_size=4, device="cpu")   # 4-D map -> pooled
    top1 = knn_monitor(model, imgs, torch.arange(11) % 2, imgs, torch.arange(11) % 2, 2, batch_size=3,
                       device="cpu", rank=0, world_size=1, k=1)

    assert torch.equal(torch.get_rng_state(), t_state)
    s2 = np.random.get_state()
    assert s2[0] == np_state[0] and np.array_equal(s2[1], np_state[1]) and s2[2:] == np_state[2:]
    assert random.getstate() == py_state
    assert feats.shape == (11, 8)
    torch.testing.assert_close(feats.norm(dim=1), torch.ones(11))
    with torch.no_grad():
        ref = torch.nn.functional.normalize(model(imgs).mean(dim=(2, 3)), dim=1)
    torch.testing.assert_close(feats, ref)
    assert top1 == 100.0   # k=1: each test sample is its own nearest training sample
    assert not feats.requires_grad


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_one_and_two_processes_agree(tmp_path):
    import dist_worker_knn as w

    backbone_fn, train_x, train_y, test_x, test_y, c = w.make_problem()
    feats1 = extract_features(backbone_fn, train_x, batch_size=5, device="cpu")
    top1 = knn_monitor(backbone_fn, train_x, train_y, test_x, test_y, c, batch_size=5, device="cpu",
                       k=7, temperature=0.1)
    top1_of_features, top5 = knn_accuracy(feats1, train_y, extract_features(backbone_fn, test_x, 5, "cpu"),
                                          test_y, c, k=7, temperature=0.1)
    assert 0.0 <= top1 <= top5 <= 100.0 and top1_of_features == pytest.approx(top1)

    prefix = str(tmp_path / "knn")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={_free_port()}", os.path.join(ROOT, "tests", "dist_worker_knn.py"), prefix]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for rank in range(2):
        r = torch.load(f"{prefix}.rank{rank}.pt")
        # another batch split: float32 round-off (tests/golden.py's rule)
        assert not entries_mismatch(r["features"], feats1, f"rank {rank} features")
        assert r["top1"] == pytest.approx(top1) and r["top5"] == pytest.approx(top5)
        assert r["top1_only"] == pytest.approx(top1)


def test_monitor_images_stay_float32_on_the_cpu_and_autocast_applies_to_the_backbone_only():
    """A CPU run keeps its float32 images and arithmetic (monitor_images returns them as they are); with
    autocast (bf16 on CUDA) the backbone runs in bf16 while the similarities and votes stay float32."""
    from src.eval.knn import monitor_images
    imgs = torch.randn(12, 3, 6, 6, generator=torch.Generator().manual_seed(3))
    assert monitor_images(imgs, "cpu", on_device=True) is imgs
    dtypes = []

    def backbone(x):
        out = _tiny_model()(x)
        dtypes.append((x.dtype, out.dtype, torch.is_autocast_enabled("cpu")))
        return out
    labels = torch.arange(12) % 3
    top1 = knn_monitor(backbone, imgs.bfloat16(), labels, imgs.bfloat16(), labels, 3, batch_size=5, device="cpu",
                       k=1, autocast_dtype=torch.bfloat16)
    assert top1 == 100.0  # each image is its own nearest neighbour
    assert dtypes and all(d == (torch.bfloat16, torch.bfloat16, True) for d in dtypes)
    assert not torch.is_autocast_enabled("cpu")
