"""src/data/datasets.py, transforms.py: CIFAR pickles (torchvision's format), keywords, image folders, transforms."""
import os
import pickle
import shutil

import numpy as np
import pytest
import torch
import torchvision
import torchvision.datasets.cifar as tv_cifar
from PIL import Image
from torchvision import transforms as T

from src.data.constants import CIFAR_MEAN, EVAL_STD, PRETRAIN_STD
from src.data.datasets import DataError, load_split
from src.data.transforms import LabeledDataset, MultiCropDataset, MultiCropTransform, eval_transforms, plain_tensor
from tests.fake_cifar import (CIFAR10_CLASSES, CIFAR10_JPG_SMALL, CIFAR100_CLASSES, write_cifar10, write_cifar100,
                              write_image_folder)


def _no_md5(monkeypatch):
    """Let torchvision's own CIFAR classes read our tiny files (they check md5s of the real ones)."""
    monkeypatch.setattr(torchvision.datasets.CIFAR10, "_check_integrity", lambda self: True)
    monkeypatch.setattr(tv_cifar, "check_integrity", lambda *a, **k: True)


def _one_line_error(excinfo):
    msg = str(excinfo.value)
    assert "\n" not in msg and msg.strip() == msg and msg
    return msg


# ------------------------------------------------------------------------------------------------
# CIFAR pickles
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("train", [True, False])
def test_cifar10_reader_matches_torchvision(tmp_path, monkeypatch, train):
    write_cifar10(tmp_path, n_train_per_batch=7, n_test=11)
    _no_md5(monkeypatch)
    ref = torchvision.datasets.CIFAR10(str(tmp_path), train=train, download=False)
    images, labels, classes = load_split(str(tmp_path), train=train, download=False)
    assert images.dtype == np.uint8 and images.shape == ((35 if train else 11), 32, 32, 3)
    assert images.flags["C_CONTIGUOUS"]
    assert labels.dtype == np.int64 and labels.shape == (len(images),)
    np.testing.assert_array_equal(images, ref.data)
    np.testing.assert_array_equal(labels, np.asarray(ref.targets))
    assert classes == ref.classes == CIFAR10_CLASSES
    # PIL images seen by torchvision's data set are ours too
    img, target = ref[3]
    np.testing.assert_array_equal(np.asarray(img), images[3])
    assert target == labels[3]
    # the folder itself, recognised by name or by content, is accepted as well
    folder = tmp_path / "cifar-10-batches-py"
    renamed = tmp_path / "renamed"
    for p in (folder, renamed):
        if p is renamed:
            folder.rename(renamed)
        im2, lab2, cl2 = load_split(str(p), train=train)
        np.testing.assert_array_equal(im2, images)
        np.testing.assert_array_equal(lab2, labels)
        assert cl2 == classes


@pytest.mark.parametrize("train", [True, False])
def test_cifar100_reader_matches_torchvision(tmp_path, monkeypatch, train):
    write_cifar100(tmp_path, n_train=130, n_test=40)
    _no_md5(monkeypatch)
    ref = torchvision.datasets.CIFAR100(str(tmp_path), train=train, download=False)
    images, labels, classes = load_split(tmp_path, train=train)
    assert images.shape == ((130 if train else 40), 32, 32, 3) and images.dtype == np.uint8
    np.testing.assert_array_equal(images, ref.data)
    np.testing.assert_array_equal(labels, np.asarray(ref.targets))
    assert classes == ref.classes == CIFAR100_CLASSES and len(classes) == 100
    im2, lab2, _ = load_split(tmp_path / "cifar-100-python", train=train)
    np.testing.assert_array_equal(im2, images)
    np.testing.assert_array_equal(lab2, labels)


def test_reader_channel_order(tmp_path):
    """CIFAR rows are 1024 R, then 1024 G, then 1024 B values, row-major."""
    folder = write_cifar10(tmp_path, n_train_per_batch=2, n_test=2)
    row = np.zeros((1, 3072), dtype=np.uint8)
    row[0, 0] = 10          # R at (0, 0)
    row[0, 1024 + 1] = 20   # G at (0, 1)
    row[0, 2048 + 32] = 30  # B at (1, 0)
    with open(folder / "test_batch", "wb") as f:
        pickle.dump({"batch_label": "testing batch 1 of 1", "labels": [4], "data": row,
                     "filenames": ["x.png"]}, f, protocol=2)
    images, labels, _ = load_split(tmp_path, train=False)
    assert images.shape == (1, 32, 32, 3) and labels.tolist() == [4]
    assert images[0, 0, 0].tolist() == [10, 0, 0]
    assert images[0, 0, 1].tolist() == [0, 20, 0]
    assert images[0, 1, 0].tolist() == [0, 0, 30]


def test_fake_cifar_is_learnable(tmp_path):
    write_cifar10(tmp_path, n_train_per_batch=40, n_test=100)
    xtr, ytr, _ = load_split(tmp_path, True)
    xte, yte, _ = load_split(tmp_path, False)
    assert sorted(set(ytr.tolist())) == list(range(10))
    f = lambda x: x.reshape(len(x), -1).astype(np.float64)  # noqa: E731
    centroids = np.stack([f(xtr)[ytr == c].mean(0) for c in range(10)])
    pred = ((f(xte)[:, None, :] - centroids[None]) ** 2).sum(-1).argmin(1)
    assert (pred == yte).mean() > 0.8


@pytest.mark.parametrize("victim", ["data_batch_3", "batches.meta"])
def test_missing_or_corrupt_cifar_file(tmp_path, victim):
    folder = write_cifar10(tmp_path, n_train_per_batch=2, n_test=2)
    (folder / victim).unlink()
    with pytest.raises(DataError) as e:
        load_split(tmp_path, train=True)
    assert victim in _one_line_error(e)
    (folder / victim).write_bytes(b"\x80\x02}q\x00(X")  # truncated pickle
    with pytest.raises(DataError) as e:
        load_split(tmp_path, train=True)
    assert victim in _one_line_error(e)


def test_foreign_pickle_is_refused_not_run(tmp_path):
    folder = write_cifar10(tmp_path, n_train_per_batch=2, n_test=2)
    marker = tmp_path / "ran"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    with open(folder / "test_batch", "wb") as f:
        pickle.dump({"data": Evil(), "labels": []}, f, protocol=2)
    with pytest.raises(DataError) as e:
        load_split(tmp_path, train=False)
    assert "test_batch" in _one_line_error(e)
    assert not marker.exists()


def test_bad_label_or_shape(tmp_path):
    folder = write_cifar10(tmp_path, n_train_per_batch=2, n_test=2)
    with open(folder / "test_batch", "wb") as f:
        pickle.dump({"data": np.zeros((2, 3072), np.uint8), "labels": [0, 10]}, f, protocol=2)
    with pytest.raises(DataError, match="labels outside"):
        load_split(tmp_path, train=False)
    with open(folder / "test_batch", "wb") as f:
        pickle.dump({"data": np.zeros((2, 1024), np.uint8), "labels": [0, 1]}, f, protocol=2)
    with pytest.raises(DataError, match="3072"):
        load_split(tmp_path, train=False)


# ------------------------------------------------------------------------------------------------
# keywords
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kw,folder,layout", [("cifar10", "data/CIFAR-10", "cifar-10-batches-py"),
                                              ("cifar100", "data/CIFAR-100", "cifar-100-python")])
def test_keyword_missing_no_download(tmp_path, monkeypatch, kw, folder, layout):
    monkeypatch.chdir(tmp_path)

    def fail(*a, **k):
        raise AssertionError("download attempted")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", fail)
    monkeypatch.setattr(torchvision.datasets, "CIFAR100", fail)
    with pytest.raises(DataError) as e:
        load_split(kw, train=True, download=False)
    msg = _one_line_error(e)
    assert folder in msg and layout in msg and "--data_path" in msg


def test_keyword_download_failure_is_data_error(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    calls = []

    def offline(root, train, download):
        calls.append((root, train, download))
        raise OSError("<urlopen error [Errno -3] Temporary failure in name resolution>\nsecond line")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", offline)
    with pytest.raises(DataError) as e:
        load_split("cifar10", train=False, download=True)
    msg = _one_line_error(e)
    assert calls == [("data/CIFAR-10", False, True)]
    assert "download failed" in msg and "data/CIFAR-10" in msg and "batches.meta" in msg


def test_keyword_download_offline_leaves_no_empty_folder(tmp_path, monkeypatch):
    """torchvision's real download, offline (through a proxy that refuses): one-line error, and the folders the
    attempt made and left empty are gone; folders that were there before stay."""
    for var in ("https_proxy", "http_proxy", "HTTPS_PROXY", "HTTP_PROXY"):
        monkeypatch.setenv(var, "http://127.0.0.1:9")
    monkeypatch.setenv("no_proxy", "")
    monkeypatch.setenv("NO_PROXY", "")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError) as e:
        load_split("cifar10", train=True, download=True)
    assert "download failed" in _one_line_error(e) and "cifar-10-python.tar.gz" in str(e.value)
    assert os.listdir(tmp_path) == []
    (tmp_path / "data").mkdir()
    with pytest.raises(DataError):
        load_split("cifar100", train=True, download=True)
    assert os.listdir(tmp_path) == ["data"] and os.listdir(tmp_path / "data") == []
    # the partial tarball of a download cut off part-way: its MD5 is not the tarball's, so torchvision
    # downloads it again (refused here) rather than extract it, and it stays for that next attempt
    partial = tmp_path / "data" / "CIFAR-10" / "cifar-10-python.tar.gz"
    partial.parent.mkdir()
    partial.write_bytes(b"\x1f\x8b" + bytes(4094))
    with pytest.raises(DataError) as e:
        load_split("cifar10", train=True, download=True)
    assert "download failed (URLError" in _one_line_error(e) and "Connection refused" in str(e.value)
    assert os.listdir(partial.parent) == [partial.name] and partial.stat().st_size == 4096


def test_keyword_reads_present_data_and_downloads_missing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    calls = []

    def fake_download(root, train, download):  # what torchvision leaves on disk
        calls.append(root)
        write_cifar100(root, n_train=10, n_test=5)

    monkeypatch.setattr(torchvision.datasets, "CIFAR100", fake_download)
    images, labels, classes = load_split("cifar100", train=False, download=True)
    assert calls == ["data/CIFAR-100"] and images.shape == (5, 32, 32, 3) and len(classes) == 100
    # present now: read directly, no second download
    images2, _, _ = load_split("cifar100", train=False, download=True)
    np.testing.assert_array_equal(images, images2)
    assert calls == ["data/CIFAR-100"]

    write_cifar10(tmp_path / "data" / "CIFAR-10", n_train_per_batch=3, n_test=2)
    images, labels, classes = load_split("cifar10", train=True, download=False)
    assert images.shape == (15, 32, 32, 3) and classes == CIFAR10_CLASSES


# ------------------------------------------------------------------------------------------------
# layouts
# ------------------------------------------------------------------------------------------------

def test_bad_layouts(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "only_train" / "train" / "cat").mkdir(parents=True)
    (tmp_path / "afile.tar.gz").write_bytes(b"x")
    both = tmp_path / "both"
    (both / "cifar-10-batches-py").mkdir(parents=True)
    (both / "cifar-100-python").mkdir()
    for p, expect in [(tmp_path / "nope", "does not exist"), (tmp_path / "empty", "nothing"),
                      (tmp_path / "afile.tar.gz", "is a file"),
                      (both, "both")]:
        with pytest.raises(DataError) as e:
            load_split(str(p), train=True)
        msg = _one_line_error(e)
        assert expect in msg
        if expect != "both":
            assert "cifar10" in msg and "cifar-100-python" in msg and "train/<class>" in msg


def test_near_miss_layouts_say_what_to_change(tmp_path):
    """The usual near misses of a newcomer get the change to make in their one line: train/ missing, test/
    called val/, a CIFAR tarball not extracted, a split or the folder above given instead of the image folder,
    images not in class folders."""
    def folders(*paths):
        for p in paths:
            (tmp_path / p).mkdir(parents=True)
        return tmp_path / paths[0].split("/")[0]
    (folders("tarball") / "cifar-100-python.tar.gz").write_bytes(b"x")
    (folders("flat") / "a.png").write_bytes(b"x")
    cases = [(folders("no_train/test/cat"), "has no train/"),
             (folders("val/train/cat", "val/val/cat"), f"has no test/ (a val/ split is test/ here: ln -s val {tmp_path}/val/test)"),
             (tmp_path / "tarball", f"extract cifar-100-python.tar.gz first (tar xzf {tmp_path}/tarball/"),
             (folders("split/train/cat", "split/test/cat") / "train", f"pass its parent, --data_path {tmp_path}/split"),
             (folders("above/data/train/cat", "above/data/test/cat"), f"pass --data_path {tmp_path}/above/data"),
             (tmp_path / "flat", "images directly in it")]
    for path, hint in cases:
        with pytest.raises(DataError) as e:
            load_split(str(path), train=False)  # the split that every layout here lacks
        msg = _one_line_error(e)
        assert hint in msg and ("accepted:" in msg or "pretraining reads train/ alone" in msg), msg


def test_image_folder_without_test_split_is_enough_for_pretraining(tmp_path):
    """train/ alone: its training split loads (pretraining without the kNN monitor needs no more, as with
    CIFAR files without their test batch); its test split is a one-line error naming the missing folder."""
    for i, c in enumerate(("cat", "dog")):
        (tmp_path / "train" / c).mkdir(parents=True)
        Image.fromarray(np.full((24, 40, 3), 60 * i, np.uint8)).save(tmp_path / "train" / c / "0.png")
    images, labels, classes = load_split(str(tmp_path), train=True)
    assert images.shape == (2, 24, 40, 3) and labels.tolist() == [0, 1] and classes == ["cat", "dog"]
    with pytest.raises(DataError) as e:
        load_split(str(tmp_path), train=False)
    assert "has no test/; pretraining reads train/ alone, the kNN monitor (--knn_freq)" in _one_line_error(e)


def test_image_folder_matches_torchvision_imagefolder(tmp_path):
    root = write_image_folder(tmp_path, 3, 2, classes=("dog", "cat", "airplane"), fmt="png")
    (root / "train" / "cat" / "notes.txt").write_text("not an image")
    # a grayscale image is converted to RGB
    Image.fromarray(np.full((32, 32), 77, np.uint8), mode="L").save(root / "train" / "cat" / "0003.png")
    images, labels, classes = load_split(str(root), train=True)
    assert classes == ["airplane", "cat", "dog"]
    assert images.shape == (10, 32, 32, 3) and images.dtype == np.uint8
    assert labels.dtype == np.int64 and labels.tolist() == [0, 0, 0, 1, 1, 1, 1, 2, 2, 2]
    ref = torchvision.datasets.ImageFolder(str(root / "train"))
    assert ref.classes == classes and [t for _, t in ref.samples] == labels.tolist()
    for i in range(len(ref)):
        np.testing.assert_array_equal(np.asarray(ref[i][0]), images[i])
    assert (images[6] == 77).all()
    timages, tlabels, tclasses = load_split(root, train=False)
    assert tclasses == classes and timages.shape == (6, 32, 32, 3)
    assert tlabels.tolist() == [0, 0, 1, 1, 2, 2]


def test_image_folder_jpg_and_errors(tmp_path):
    root = write_image_folder(tmp_path, 2, 1, classes=("a", "b"), size=(24, 16), fmt="jpg")
    images, _, _ = load_split(root, train=True)
    assert images.shape == (4, 16, 24, 3)

    odd = root / "train" / "b" / "zz_odd.jpg"
    Image.fromarray(np.zeros((20, 24, 3), np.uint8)).save(odd)
    with pytest.raises(DataError) as e:
        load_split(root, train=True)
    msg = _one_line_error(e)
    assert "zz_odd.jpg" in msg and "same size" in msg
    odd.unlink()

    broken = root / "train" / "a" / "zz_broken.jpg"
    broken.write_bytes(b"not a jpeg")
    with pytest.raises(DataError) as e:
        load_split(root, train=True)
    assert "zz_broken.jpg" in _one_line_error(e)
    broken.unlink()

    (root / "test" / "c").mkdir()
    with pytest.raises(DataError) as e:
        load_split(root, train=True)
    assert "differ" in _one_line_error(e)
    (root / "train" / "c").mkdir()
    with pytest.raises(DataError) as e:
        load_split(root, train=True)
    assert "no image files" in _one_line_error(e)


def test_image_folder_links_out_of_a_class_or_in_a_loop_are_refused(tmp_path):
    """A link to a folder is followed inside its class folder; one that leads to another class (the
    images would take this class's label) or loops back above itself stops with one line."""
    root = write_image_folder(tmp_path, 2, 1, classes=("a", "b"), fmt="png")
    (root / "train" / "a" / "more").mkdir()
    write_image_folder(tmp_path / "extra", 1, 1, classes=("a",), fmt="png")
    shutil.copy(tmp_path / "extra" / "train" / "a" / "0000.png", root / "train" / "a" / "more" / "x.png")
    os.symlink("more", root / "train" / "a" / "alias")  # inside the class folder: followed, as torchvision does
    images, labels, _ = load_split(root, train=True)
    assert labels.tolist() == [0, 0, 0, 0, 1, 1]
    for name, target, phrase in (("loop", "..", "outside its class folder"),  # a/loop -> train/: all classes
                                 ("self", ".", "a folder that contains it (a loop)"),
                                 ("other", "../b", "outside its class folder")):
        link = root / "train" / "a" / "more" / name if name == "self" else root / "train" / "a" / name
        os.symlink(target, link)
        with pytest.raises(DataError) as e:
            load_split(root, train=True)
        assert phrase in _one_line_error(e) and str(link) in str(e.value)
        link.unlink()


# ------------------------------------------------------------------------------------------------
# transforms
# ------------------------------------------------------------------------------------------------

def _pil(seed=0, size=32):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))


def test_multicrop_equals_released_pipeline():
    img = _pil()
    mc = MultiCropTransform([32, 16], [2, 3], [0.14, 0.05], [1.0, 0.14])
    ref = []
    for size, n, lo, hi in [(32, 2, 0.14, 1.0), (16, 3, 0.05, 0.14)]:
        t = T.Compose([T.RandomResizedCrop(size, scale=(lo, hi)), T.RandomHorizontalFlip(p=0.5),
                       T.Compose([T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
                                  T.RandomGrayscale(p=0.2)]),
                       T.ToTensor(), T.Normalize(mean=CIFAR_MEAN, std=PRETRAIN_STD)])
        ref.extend([t] * n)
    for seed in range(4):
        torch.manual_seed(seed)
        out = mc(img)
        torch.manual_seed(seed)
        expect = [t(img) for t in ref]
        assert len(out) == 5
        assert [tuple(o.shape) for o in out] == [(3, 32, 32)] * 2 + [(3, 16, 16)] * 3
        for a, b in zip(out, expect):
            assert a.dtype == torch.float32 and torch.equal(a, b)
    # crops differ from one another
    assert not torch.equal(out[0], out[1])


def test_multicrop_normalisation():
    """A flat grey image stays flat and grey under every augmentation (brightness may change it):
    undoing the pretraining normalisation must give equal channels on the k/255 grid."""
    img = Image.fromarray(np.full((32, 32, 3), 128, np.uint8))
    torch.manual_seed(0)
    for crop in MultiCropTransform([32, 16], [4, 4], [0.14, 0.05], [1.0, 0.14])(img):
        assert torch.allclose(crop, crop[:, :1, :1].expand_as(crop))  # still flat
        rgb = crop[:, 0, 0] * torch.tensor(PRETRAIN_STD) + torch.tensor(CIFAR_MEAN)
        assert torch.allclose(rgb, rgb[:1].expand(3), atol=1e-5)
        assert torch.allclose(rgb * 255, (rgb * 255).round(), atol=1e-3)


def test_multicrop_validation():
    with pytest.raises(ValueError, match="same length"):
        MultiCropTransform([32, 16], [2], [0.14], [1.0])
    with pytest.raises(ValueError, match="empty"):
        MultiCropTransform([], [], [], [])
    with pytest.raises(ValueError, match="min_scale_crops <= max_scale_crops"):
        MultiCropTransform([32], [2], [0.9], [0.2])


def test_multicrop_dataset():
    images = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    ds = MultiCropDataset(images, MultiCropTransform([32], [2], [0.14], [1.0]))
    assert len(ds) == 4
    crops = ds[2]
    assert isinstance(crops, list) and len(crops) == 2 and crops[0].shape == (3, 32, 32)
    loader = torch.utils.data.DataLoader(ds, batch_size=2, drop_last=True)
    batch = next(iter(loader))
    assert len(batch) == 2 and batch[0].shape == (2, 3, 32, 32)


def test_eval_transforms_and_plain_tensor():
    images = np.random.default_rng(1).integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    train_tf, test_tf = eval_transforms(32)
    ref_train = T.Compose([T.RandomResizedCrop(32), T.RandomHorizontalFlip(), T.ToTensor(),
                           T.Normalize(mean=CIFAR_MEAN, std=EVAL_STD)])
    img = Image.fromarray(images[0])
    torch.manual_seed(3)
    a = train_tf(img)
    torch.manual_seed(3)
    assert torch.equal(a, ref_train(img)) and a.shape == (3, 32, 32)
    # test transform: ToTensor + Normalize(eval std), and plain_tensor is bit-identical to it
    x = test_tf(img)
    manual = (torch.from_numpy(images[0]).permute(2, 0, 1).float() / 255
              - torch.tensor(CIFAR_MEAN).view(3, 1, 1)) / torch.tensor(EVAL_STD).view(3, 1, 1)
    assert torch.allclose(x, manual, atol=1e-6)
    pt = plain_tensor(images, CIFAR_MEAN, EVAL_STD, chunk=2)
    assert pt.shape == (5, 3, 32, 32) and pt.dtype == torch.float32 and pt.is_contiguous()
    assert torch.equal(pt, torch.stack([test_tf(Image.fromarray(im)) for im in images]))
    pt2 = plain_tensor(images, CIFAR_MEAN, PRETRAIN_STD)
    assert not torch.equal(pt, pt2)


def test_labeled_dataset():
    images = np.random.default_rng(2).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    labels = np.array([2, 0, 1], dtype=np.int64)
    _, test_tf = eval_transforms(32)
    ds = LabeledDataset(images, labels, test_tf)
    x, y = ds[2]
    assert len(ds) == 3 and type(y) is int and y == 1 and torch.equal(x, test_tf(Image.fromarray(images[2])))
    xb, yb = next(iter(torch.utils.data.DataLoader(ds, batch_size=3)))
    assert xb.shape == (3, 3, 32, 32) and yb.tolist() == [2, 0, 1]
    with pytest.raises(ValueError):
        LabeledDataset(images, labels[:2], test_tf)


# ------------------------------------------------------------------------------------------------
# real JPEG export
# ------------------------------------------------------------------------------------------------

def test_small_real_cifar10_image_folder():
    """The committed real-image set (tests/data/cifar10_jpg_small) reads as an image folder."""
    root = CIFAR10_JPG_SMALL
    for split, n in (("train", 30), ("test", 10)):
        for c in CIFAR10_CLASSES:
            assert len(list((root / split / c).glob("*.jpg"))) == n
    images, labels, classes = load_split(root, train=True)
    assert classes == sorted(CIFAR10_CLASSES) == CIFAR10_CLASSES
    assert images.shape == (300, 32, 32, 3) and np.bincount(labels).tolist() == [30] * 10
    assert images.std() > 20  # real pictures, not blank
    timages, tlabels, _ = load_split(root, train=False)
    assert timages.shape == (100, 32, 32, 3) and np.bincount(tlabels).tolist() == [10] * 10


def test_synthetic_cifar_command(tmp_path, capsys):
    """tools/synthetic_cifar.py is a command: its usage on --help, a wrong argument in one line (exit 2), and
    the files it writes are what `--data_path` reads."""
    import subprocess
    import sys
    tools = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools")
    for argv, status in ((["--help"], 0), (["--bogus"], 2)):
        res = subprocess.run([sys.executable, os.path.join(tools, "synthetic_cifar.py")] + argv, capture_output=True,
                             text=True, timeout=60)
        assert res.returncode == status, argv
        assert res.stdout.startswith("usage: synthetic_cifar.py") if status == 0 else \
            (res.stdout == "" and len(res.stderr.splitlines()) == 1 and res.stderr.startswith("error: "))
    sys.path.insert(0, tools)
    import synthetic_cifar
    for wrong in ([], [str(tmp_path / "x"), "--n_train", "7"], [str(tmp_path / "x"), "--n_test", "0"]):
        with pytest.raises(SystemExit) as stop:
            synthetic_cifar.main(wrong)
        err = capsys.readouterr().err
        assert stop.value.code == 2 and len(err.splitlines()) == 1 and err.startswith("error: "), wrong
    assert not os.path.exists(tmp_path / "x")
    with pytest.raises(SystemExit):
        synthetic_cifar.main([str(tmp_path / "x"), "--dataset", "cifar100", "--n_train", "0"])
    assert capsys.readouterr().err == "error: --n_train 0: give a positive number of images\n"  # no word of cifar10
    synthetic_cifar.main([str(tmp_path / "c100"), "--dataset", "cifar100", "--n_train", "300", "--n_test", "100"])
    images, labels, classes = load_split(str(tmp_path / "c100"), train=True)
    assert len(images) == 300 and len(classes) == 100
