"""Data sets and CPU transforms.

`load_split` turns a `--data_path` value into in-memory arrays (uint8 N x H x W x 3 images, int64
labels, class names). Three layouts are accepted:

1. the keywords `cifar10` / `cifar100` (released meaning: torchvision data under `data/CIFAR-10` /
   `data/CIFAR-100` relative to the working directory, downloaded by torchvision when missing);
2. a folder holding (or being) torchvision's python-version CIFAR folder `cifar-10-batches-py` /
   `cifar-100-python`;
3. an image-folder tree `train/<class>/*.jpg`, `test/<class>/*.jpg` (class order = sorted names, as
   torchvision's `ImageFolder`).

The CIFAR pickles are read by our own reader (torchvision's on-disk format, no md5 checks) through a
restricted unpickler that only rebuilds NumPy arrays, so a foreign pickle cannot run code.
"""
import os
import pickle
from pathlib import Path

import numpy as np
from PIL import Image

# torchvision's python-version CIFAR layouts
_CIFAR = {
    "cifar10": {
        "folder": "cifar-10-batches-py",
        "train": [f"data_batch_{i}" for i in range(1, 6)],
        "test": ["test_batch"],
        "meta": "batches.meta",
        "meta_key": "label_names",
        "label_key": "labels",
        "keyword_root": os.path.join("data", "CIFAR-10"),
        "layout": "cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta}",
        "tarball": "cifar-10-python.tar.gz",
    },
    "cifar100": {
        "folder": "cifar-100-python",
        "train": ["train"],
        "test": ["test"],
        "meta": "meta",
        "meta_key": "fine_label_names",
        "label_key": "fine_labels",
        "keyword_root": os.path.join("data", "CIFAR-100"),
        "layout": "cifar-100-python/{train,test,meta}",
        "tarball": "cifar-100-python.tar.gz",
    },
}


# torchvision.datasets.folder.IMG_EXTENSIONS
_IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


_ACCEPTED = ("accepted: the keyword cifar10 or cifar100 (torchvision data under data/CIFAR-10 or "
             "data/CIFAR-100); a folder holding (or being) cifar-10-batches-py or cifar-100-python "
             "(torchvision's python-version CIFAR files); or a folder with train/ and test/ "
             "subfolders of class folders (train/<class>/<image>)")


class DataError(Exception):
    """A data problem; the message is one line (entry scripts print it and exit 1)."""

    def __init__(self, message):
        super().__init__(" ".join(str(message).split()))


_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),
}


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickler that only rebuilds plain containers and NumPy arrays (what CIFAR files hold)."""

    def find_class(self, module, name):
        if (module, name) in _ALLOWED_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"unexpected object {module}.{name} (not a CIFAR data file)")


def _read_pickle(path):
    if not path.is_file():
        raise DataError(f"missing CIFAR file {path}")
    try:
        with open(path, "rb") as f:
            return _ArrayUnpickler(f, encoding="latin1").load()
    except Exception as e:  # truncated, not a pickle, foreign objects, ...
        raise DataError(f"cannot read CIFAR file {path}: {type(e).__name__}: {e}") from None


def _read_cifar(folder, kind, train):
    """Read torchvision's python-version CIFAR files from `folder` (no md5 checks)."""
    spec = _CIFAR[kind]
    folder = Path(folder)
    meta_path = folder / spec["meta"]
    meta = _read_pickle(meta_path)
    if not isinstance(meta, dict) or spec["meta_key"] not in meta:
        raise DataError(f"CIFAR file {meta_path} has no '{spec['meta_key']}' entry")
    classes = [str(c) for c in meta[spec["meta_key"]]]

    data, labels = [], []
    for name in spec["train" if train else "test"]:
        path = folder / name
        entry = _read_pickle(path)
        if not isinstance(entry, dict) or "data" not in entry or spec["label_key"] not in entry:
            raise DataError(f"CIFAR file {path} lacks the 'data' or '{spec['label_key']}' entry")
        d = np.asarray(entry["data"])
        lab = np.asarray(entry[spec["label_key"]], dtype=np.int64).reshape(-1)
        if d.dtype != np.uint8 or d.ndim != 2 or d.shape[1] != 3 * 32 * 32:
            raise DataError(f"CIFAR file {path}: 'data' is {d.dtype} of shape {d.shape}, "
                            "expected uint8 N x 3072")
        if len(lab) != len(d):
            raise DataError(f"CIFAR file {path}: {len(d)} images but {len(lab)} labels")
        if len(lab) and (lab.min() < 0 or lab.max() >= len(classes)):
            raise DataError(f"CIFAR file {path}: labels outside 0..{len(classes) - 1} "
                            f"({len(classes)} class names in {meta_path.name})")
        data.append(d)
        labels.append(lab)
    images = np.vstack(data).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(images), np.concatenate(labels), classes


def _cifar_files_present(folder, kind, train):
    spec = _CIFAR[kind]
    names = spec["train" if train else "test"] + [spec["meta"]]
    return all((Path(folder) / n).is_file() for n in names)


def _missing_folders(path):
    """The folders of `path` that do not exist yet, deepest first."""
    missing, p = [], Path(path)
    while not p.exists() and p != p.parent:
        missing.append(p)
        p = p.parent
    return missing


def _remove_if_empty(folders):
    """Remove `folders` (deepest first) while they are empty: what a failed download made and left empty."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:   # holds something (a partial download torchvision checks next time), or gone
            return


def _load_keyword(kind, train, download):
    spec = _CIFAR[kind]
    root = spec["keyword_root"]
    folder = Path(root) / spec["folder"]
    if not _cifar_files_present(folder, kind, train):
        how = (f"no {spec['layout']} under {os.path.abspath(root)} (looked in {root} relative to "
               f"the working directory); provide it by extracting torchvision's python-version "
               f"tarball ({spec['tarball']}) there, or pass --data_path to a folder holding "
               f"{spec['folder']} or an image-folder tree")
        if not download:
            raise DataError(f"{kind}: {how}")
        created = _missing_folders(root)   # torchvision makes them before it downloads
        try:
            from torchvision import datasets
            cls = datasets.CIFAR10 if kind == "cifar10" else datasets.CIFAR100
            cls(root, train=train, download=True)
        except Exception as e:
            _remove_if_empty(created)   # offline: no empty data/CIFAR-10/ left behind
            raise DataError(f"{kind}: download failed ({type(e).__name__}: {e}); {how}") from None
        if not _cifar_files_present(folder, kind, train):
            raise DataError(f"{kind}: download finished but {how}")
    return _read_cifar(folder, kind, train)


def _class_folders(split_dir):
    return sorted(e.name for e in os.scandir(split_dir) if e.is_dir())


def _image_files(class_dir):
    """Image files under `class_dir`, in torchvision `make_dataset` order. Links to folders are followed
    only when they stay inside the class folder and do not loop: one that leads out of it (to another
    class, say) or back to a folder above it would give other images this class's label (DataError)."""
    top = os.path.realpath(class_dir)
    walked = []
    for root, dirs, fnames in os.walk(class_dir, followlinks=True):
        here = os.path.realpath(root)
        for d in dirs:
            link = os.path.join(root, d)
            if not os.path.islink(link):
                continue
            target = os.path.realpath(link)
            if not (target == top or target.startswith(top + os.sep)):
                raise DataError(f"image folder: {link} links to {target}, outside its class folder {class_dir}; "
                                "remove the link or copy the images in")
            if here == target or here.startswith(target + os.sep):
                raise DataError(f"image folder: {link} links to {target}, a folder that contains it (a loop); "
                                "remove the link")
        walked.append((root, fnames))
    out = []
    for root, fnames in sorted(walked):
        for fname in sorted(fnames):
            if fname.lower().endswith(_IMG_EXTENSIONS):
                out.append(os.path.join(root, fname))
    return out


def _decode(path):
    try:
        with Image.open(path) as im:
            return np.asarray(im if im.mode == "RGB" else im.convert("RGB"))
    except Exception as e:
        raise DataError(f"cannot decode image {path}: {type(e).__name__}: {e}") from None


def _load_image_folder(root, train):
    root = Path(root)
    split = "train" if train else "test"
    split_dir = root / split
    classes = _class_folders(split_dir)
    if not classes:
        raise DataError(f"image folder {split_dir} has no class folders (expected {split}/<class>/<image>)")
    other = root / ("test" if train else "train")
    other_classes = _class_folders(other) if other.is_dir() else classes  # no test/: pretraining alone
    if other_classes != classes:
        only_here = sorted(set(classes) - set(other_classes))
        only_there = sorted(set(other_classes) - set(classes))
        raise DataError(f"image folder {root}: class folders of train/ and test/ differ "
                        f"(only in {split}/: {only_here}; only in {other.name}/: {only_there})")
    files, labels = [], []
    for idx, c in enumerate(classes):
        fs = _image_files(split_dir / c)
        if not fs:
            raise DataError(f"image folder {split_dir / c} holds no image files "
                            f"({', '.join(_IMG_EXTENSIONS)})")
        files.extend(fs)
        labels.extend([idx] * len(fs))

    # A plain loop: decoding 32x32 JPEGs is dominated by Python-level overhead, and a thread pool
    # measured ~2x slower (GIL contention) for the 50k CIFAR-10 JPEG training set (about 4 s here).
    arrays = [_decode(f) for f in files]

    shape = arrays[0].shape
    images = np.empty((len(arrays),) + shape, dtype=np.uint8)
    for i, (a, f) in enumerate(zip(arrays, files)):
        if a.shape != shape:
            raise DataError(f"image {f} is {a.shape[1]}x{a.shape[0]} but {files[0]} is "
                            f"{shape[1]}x{shape[0]}; all images must have the same size")
        images[i] = a
    return images, np.asarray(labels, dtype=np.int64), classes


def _cifar_kind_of_folder(path):
    """'cifar10' / 'cifar100' when `path` itself is a python-version CIFAR folder, else None."""
    if path.name == _CIFAR["cifar10"]["folder"] or (path / "batches.meta").is_file() \
            or (path / "data_batch_1").is_file():
        return "cifar10"
    if path.name == _CIFAR["cifar100"]["folder"] or (
            (path / "meta").is_file() and ((path / "train").is_file() or (path / "test").is_file())):
        return "cifar100"
    return None


def load_split(data_path, train, download=True):
    """Load one split into memory.

    Returns `(images, labels, classes)`: uint8 array N x H x W x 3 (RGB), int64 array N, list of str.
    Raises `DataError` (one-line message) for every data problem.
    """
    data_path = str(data_path)
    if data_path in _CIFAR:
        return _load_keyword(data_path, train, download)
    path = Path(data_path)
    if not path.exists():
        raise DataError(f"data path {data_path} does not exist; {_ACCEPTED}")
    if not path.is_dir():
        raise DataError(f"data path {data_path} is a file, not a folder (extract archives first); "
                        f"{_ACCEPTED}")
    found = [k for k, s in _CIFAR.items() if (path / s["folder"]).is_dir()]
    if len(found) == 2:
        raise DataError(f"data path {data_path} holds both cifar-10-batches-py and cifar-100-python; "
                        "pass the one you mean as --data_path")
    if found:
        return _read_cifar(path / _CIFAR[found[0]]["folder"], found[0], train)
    kind = _cifar_kind_of_folder(path)
    if kind is not None:
        return _read_cifar(path, kind, train)
    if (path / "train").is_dir() and ((path / "test").is_dir() or train):
        return _load_image_folder(path, train)
    if (path / "train").is_dir():
        val = f" (a val/ split is test/ here: ln -s val {path / 'test'})" if (path / "val").is_dir() else ""
        raise DataError(f"image folder {data_path} has no test/{val}; pretraining reads train/ alone, the kNN "
                        f"monitor (--knn_freq) and the evaluations need test/<class>/<image>")
    try:
        entries = sorted(os.listdir(path))
    except OSError as e:
        raise DataError(f"cannot list data path {data_path}: {e}") from None
    shown = ", ".join(entries[:8]) + (f", ... ({len(entries)} entries)" if len(entries) > 8 else "")
    raise DataError(f"data path {data_path} has no known layout (it holds: {shown or 'nothing'}){_layout_hint(path)}; "
                    f"{_ACCEPTED}")


def _layout_hint(path):
    """What a folder of no known layout most likely needs, for the usual near misses: train/ missing, a CIFAR
    tarball not extracted, the images or the class folders one level off."""
    if (path / "test").is_dir():
        return ": this image folder has no train/ (train/<class>/<image>, read by pretraining and the evaluations)"
    tarballs = [s["tarball"] for s in _CIFAR.values() if (path / s["tarball"]).is_file()]
    if tarballs:
        return f": extract {tarballs[0]} first (tar xzf {path / tarballs[0]} -C {path})"
    if path.name in ("train", "test") and (path.parent / "train").is_dir():
        return f": this is a split of an image folder; pass its parent, --data_path {path.parent}"
    inner = [e for e in sorted(path.iterdir()) if e.is_dir() and (e / "train").is_dir()]
    if inner:
        return f": its subfolder {inner[0].name}/ is an image folder; pass --data_path {inner[0]}"
    if any(e.is_file() and e.name.lower().endswith(_IMG_EXTENSIONS) for e in path.iterdir()):
        return ": images directly in it; an image folder puts them in train/<class>/ and test/<class>/"
    return ""
