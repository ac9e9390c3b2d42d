"""The released CPU transforms, built from torchvision transforms on PIL images: `MultiCropTransform`
(pretraining) and `eval_transforms` (linear evaluation), the data sets that apply them, and the plain
normalised tensor of a split (kNN monitor, cached probe).
"""
import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from .constants import CIFAR_MEAN, EVAL_STD, PRETRAIN_STD


class MultiCropTransform:
    """Released multi-crop pipeline: a list of `sum(nmb_crops)` augmented crops of one PIL image."""

    def __init__(self, size_crops, nmb_crops, min_scale_crops, max_scale_crops,
                 mean=CIFAR_MEAN, std=PRETRAIN_STD):
        lists = {"size_crops": size_crops, "nmb_crops": nmb_crops,
                 "min_scale_crops": min_scale_crops, "max_scale_crops": max_scale_crops}
        lengths = {k: len(v) for k, v in lists.items()}
        if len(set(lengths.values())) != 1:
            raise ValueError("size_crops, nmb_crops, min_scale_crops and max_scale_crops must have "
                             "the same length (got " +
                             ", ".join(f"{k}: {n}" for k, n in lengths.items()) + ")")
        if lengths["nmb_crops"] == 0:
            raise ValueError("size_crops, nmb_crops, min_scale_crops and max_scale_crops are empty")
        for i, (lo, hi) in enumerate(zip(min_scale_crops, max_scale_crops)):
            if not 0 <= lo <= hi:
                raise ValueError(f"crop scales {i}: need 0 <= min_scale_crops <= max_scale_crops "
                                 f"(got {lo} and {hi})")
        from torchvision import transforms  # here, not at the top: importing torchvision takes ~2 s
        color = [transforms.RandomApply([transforms.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
                 transforms.RandomGrayscale(p=0.2)]
        self.transforms = []
        for size, n, lo, hi in zip(size_crops, nmb_crops, min_scale_crops, max_scale_crops):
            t = transforms.Compose([
                transforms.RandomResizedCrop(size, scale=(lo, hi)),
                transforms.RandomHorizontalFlip(p=0.5),
                transforms.Compose(color),
                transforms.ToTensor(),
                transforms.Normalize(mean=mean, std=std),
            ])
            self.transforms.extend([t] * n)

    def __call__(self, img):
        return [t(img) for t in self.transforms]

    def __repr__(self):
        return f"{type(self).__name__}({len(self.transforms)} crops: {self.transforms!r})"


class MultiCropDataset(Dataset):
    """`images` (uint8 N x H x W x 3); item i = the list of crops of image i."""

    def __init__(self, images, transform):
        self.images = images
        self.transform = transform

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.transform(Image.fromarray(self.images[i]))


def eval_transforms(crop_size, mean=CIFAR_MEAN, std=EVAL_STD):
    """Released linear-evaluation transforms: `(train_tf, test_tf)`."""
    from torchvision import transforms  # here, not at the top: importing torchvision takes ~2 s
    train_tf = transforms.Compose([
        transforms.RandomResizedCrop(crop_size),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        transforms.Normalize(mean=mean, std=std),
    ])
    test_tf = transforms.Compose([
        transforms.ToTensor(),
        transforms.Normalize(mean=mean, std=std),
    ])
    return train_tf, test_tf


class LabeledDataset(Dataset):
    """`images` (uint8 N x H x W x 3) and `labels`; item i = `(transform(PIL image), int label)`."""

    def __init__(self, images, labels, transform):
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        self.images = images
        self.labels = labels
        self.transform = transform

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        img = Image.fromarray(self.images[i])
        if self.transform is not None:
            img = self.transform(img)
        return img, int(self.labels[i])


def plain_tensor(images, mean, std, chunk=4096):
    """uint8 N x H x W x 3 -> float32 N x 3 x H x W, `ToTensor` + `Normalize` without augmentation.

    Bit-identical to applying `ToTensor()` then `Normalize(mean, std)` to each image.
    """
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[3] != 3:
        raise ValueError(f"expected uint8 N x H x W x 3 images, got {images.dtype} {images.shape}")
    n, h, w, _ = images.shape
    out = torch.empty((n, 3, h, w), dtype=torch.float32)
    for s in range(0, n, chunk):
        out[s:s + chunk] = torch.from_numpy(images[s:s + chunk]).permute(0, 3, 1, 2)
    out.div_(255)
    m = torch.as_tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    sd = torch.as_tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    out.sub_(m).div_(sd)
    return out
