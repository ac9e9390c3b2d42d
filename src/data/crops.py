"""Random resized crops and flips of a whole batch on the device: torchvision's
``RandomResizedCrop.get_params`` for every sample at once, the crops resized like torchvision's tensor
``resized_crop``, and the linear evaluation's training crops (``ResizedCropFlip``). The pretraining's
multi-crops (src/data/augment.py) add colour jitter and grey on top of these.

* ``RandomResizedCrop``: exactly ``RandomResizedCrop.get_params`` (10 tries of a uniform area fraction
  and a log-uniform aspect ratio, Python rounding, acceptance ``0 < w <= W and 0 < h <= H``, uniform
  integer offsets, the same centre-crop fallback), vectorised over samples. The crop is resized like
  ``torchvision.transforms.v2.functional.resized_crop(img, top, left, h, w, [S, S], antialias=False)``
  on a float tensor: bilinear, ``align_corners=False``, source coordinates clamped to the crop (the
  ``F.interpolate`` rule), done for the whole batch in one ``F.grid_sample`` call. The horizontal flip is
  folded into the resampling grid (the output columns are reversed), and the division by 255
  (``ToTensor``) is done on the gathered uint8 images before resampling.
* The released code crops **PIL images** with PIL's bilinear filter and rounds to uint8. PIL's filter
  *antialiases* when the crop is larger than the output (its support grows with the downscale factor);
  the tensor path (``antialias=False``) always uses 2-tap bilinear interpolation. With the CIFAR recipe
  (32 px images, 32 px crops) a crop is never larger than the output, and the two agree up to PIL's
  uint8 rounding: measured on real CIFAR-10 images, at most 1/255 and 0.28/255 on average. With smaller
  outputs they do differ (32 -> 16 px: 2.3/255 on average, up to 43/255 on edges), so other multi-crop
  settings are not PIL-faithful here.
* Scratch tensors live in a :class:`Workspace` reused across calls: on the CPU a fresh multi-megabyte
  tensor costs page faults on first touch every call (glibc hands large blocks back to the system),
  which doubled the time; on CUDA it just saves allocator calls.
"""
import functools

import torch
import torch.nn.functional as F



def _default_device(generator, device):
    if device is not None:
        return torch.device(device)
    if generator is not None:
        return generator.device
    return torch.device("cpu")


def _view4(t):
    return t.view(-1, 1, 1, 1)


@functools.lru_cache(maxsize=None)
def _log_ratio(ratio):
    """log of the aspect-ratio bounds in float32, as torchvision computes them (once, not per batch)."""
    log_ratio = torch.log(torch.tensor(ratio, dtype=torch.float32))
    return float(log_ratio[0]), float(log_ratio[1])


def sample_resized_crop_params(height, width, n, scale, ratio=(3.0 / 4.0, 4.0 / 3.0), generator=None,
                               device=None):
    """``RandomResizedCrop.get_params`` for ``n`` samples at once.

    Ten tries are drawn for every sample (area fraction uniform in ``scale``, aspect ratio log-uniform in
    ``ratio``, drawn in float32 like torchvision; sizes rounded in float64 like Python's ``round``); the
    first accepted try (``0 < w <= width and 0 < h <= height``) of each sample gives its size, and the
    offsets are uniform integers in ``[0, height - h]`` and ``[0, width - w]``. Samples without an
    accepted try get torchvision's central-crop fallback. Returns ``(top, left, h, w)``, int64 tensors of
    length ``n`` on ``device`` (default: the generator's device, else CPU).
    """
    device = _default_device(generator, device)
    area = float(height * width)
    lo, hi = _log_ratio(tuple(ratio))

    u = torch.empty(n, 10, device=device).uniform_(scale[0], scale[1], generator=generator)
    lr = torch.empty(n, 10, device=device).uniform_(lo, hi, generator=generator)
    target_area = area * u.double()
    aspect = torch.exp(lr).double()
    w = torch.round(torch.sqrt(target_area * aspect)).long()  # round half to even, like Python
    h = torch.round(torch.sqrt(target_area / aspect)).long()
    ok = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    accepted = ok.any(1)
    first = ok.to(torch.uint8).argmax(1, keepdim=True)  # first maximal value = first accepted try
    h = h.gather(1, first).squeeze(1)
    w = w.gather(1, first).squeeze(1)

    # central-crop fallback, exactly as torchvision computes it (same for every sample)
    in_ratio = float(width) / float(height)
    if in_ratio < min(ratio):
        fw = width
        fh = int(round(fw / min(ratio)))
    elif in_ratio > max(ratio):
        fh = height
        fw = int(round(fh * max(ratio)))
    else:
        fw, fh = width, height
    fi, fj = (height - fh) // 2, (width - fw) // 2

    h = torch.where(accepted, h, fh)
    w = torch.where(accepted, w, fw)
    r = torch.rand(n, 2, device=device, dtype=torch.float64, generator=generator)
    top = torch.minimum((r[:, 0] * (height - h + 1)).floor().long(), height - h)
    left = torch.minimum((r[:, 1] * (width - w + 1)).floor().long(), width - w)
    top = torch.where(accepted, top, fi)
    left = torch.where(accepted, left, fj)
    return top, left, h, w


def _source_coords(start, length, out_size):
    """Source pixel coordinates (n, out_size) of ``F.interpolate(bilinear, align_corners=False)``
    resizing ``length`` pixels starting at ``start`` to ``out_size``, clamped to the crop."""
    scale = length.to(torch.float32) / out_size
    d = torch.arange(out_size, device=start.device, dtype=torch.float32) + 0.5
    src = scale[:, None] * d - 0.5
    src = torch.minimum(src.clamp_min(0), (length - 1).to(torch.float32)[:, None])
    return src + start.to(torch.float32)[:, None]


def crop_grid(top, left, h, w, size, height, width, flip=None, out=None):
    """The ``grid_sample`` grid (n, S, S, 2) of a batch of resized crops (optionally flipped)."""
    sy = _source_coords(top, h, size)  # (n, S) rows
    sx = _source_coords(left, w, size)  # (n, S) columns
    if flip is not None:
        sx = torch.lerp(sx, sx.flip(1), flip[:, None].to(sx.dtype))  # exact select
    # align_corners=False normalisation: pixel p -> (2p + 1) / size - 1
    gy = sy.mul_(2.0 / height).add_(1.0 / height - 1.0)
    gx = sx.mul_(2.0 / width).add_(1.0 / width - 1.0)
    n = top.shape[0]
    return torch.stack((gx[:, None, :].expand(n, size, size), gy[:, :, None].expand(n, size, size)), dim=-1,
                       out=out)


def resized_crop(images, top, left, h, w, size, flip=None, _ws=None):
    """Crop ``images[b, :, top[b]:top[b]+h[b], left[b]:left[b]+w[b]]`` and resize it to ``size x size``
    for the whole batch in one ``grid_sample`` call.

    Equals ``torchvision.transforms.v2.functional.resized_crop(images[b], top, left, h, w, [size, size],
    antialias=False)`` per image (bilinear, float images). ``flip`` (bool, (n,)) additionally mirrors
    the output horizontally (a ``hflip`` after the crop). Integer images are converted to float first.
    """
    if not torch.is_floating_point(images):
        images = images.float()
    n, _, height, width = images.shape
    grid_buf = None if _ws is None else _ws("grid", (n, size, size, 2), images.dtype, images.device)
    grid = crop_grid(top, left, h, w, size, height, width, flip, out=grid_buf)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)


class Workspace:
    """Named scratch tensors, reallocated only when the requested shape/dtype/device changes."""

    def __init__(self):
        self._bufs = {}

    def __call__(self, name, shape, dtype, device):
        shape = tuple(shape)
        t = self._bufs.get(name)
        if t is None or tuple(t.shape) != shape or t.dtype != dtype or t.device != torch.device(device):
            t = torch.empty(shape, dtype=dtype, device=device)
            self._bufs[name] = t
        return t


def _scratch(ws, name, shape, like):
    if ws is None:
        return torch.empty(shape, dtype=like.dtype, device=like.device)
    return ws(name, shape, like.dtype, like.device)


def channels_first(images_uint8_nhwc):
    """A data set of (N, H, W, 3) uint8 images (CIFAR's layout) as one (N, 3, H, W) uint8 tensor on its
    device, as the batched paths keep it."""
    images = torch.as_tensor(images_uint8_nhwc)
    assert images.dtype == torch.uint8 and images.ndim == 4 and images.shape[-1] == 3, \
        "expected an (N, H, W, 3) uint8 tensor"
    return images.permute(0, 3, 1, 2).contiguous()


class ResizedCropFlip:
    """The linear evaluation's training transform for a batch of a data set kept on the device:
    ``RandomResizedCrop(size)`` (scale (0.08, 1), ratio (3/4, 4/3), bilinear), ``RandomHorizontalFlip()``,
    ``ToTensor()``, ``Normalize(mean, std)``, under the tensor semantics described at the top.

    ``images_uint8_nhwc``: (N, H, W, 3) uint8 on the device that should do the work (kept as
    (N, 3, H, W)). ``__call__(indices, generator)`` returns (B, 3, size, size) float32 crops: the crop
    parameters of all samples are drawn first, then the flips, from ``generator``."""

    def __init__(self, images_uint8_nhwc, size, mean, std, scale=(0.08, 1.0), ratio=(3.0 / 4.0, 4.0 / 3.0)):
        self.data = channels_first(images_uint8_nhwc)
        self.device = self.data.device
        self.height, self.width = self.data.shape[-2:]
        self.size, self.scale, self.ratio = int(size), tuple(scale), tuple(ratio)
        self.mean = torch.tensor(mean, dtype=torch.float32, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32, device=self.device).view(1, 3, 1, 1)

    def __len__(self):
        return self.data.shape[0]

    def __call__(self, indices, generator=None):
        idx = torch.as_tensor(indices, dtype=torch.long).to(self.device, non_blocking=True)
        n = idx.shape[0]
        top, left, h, w = sample_resized_crop_params(self.height, self.width, n, self.scale, self.ratio,
                                                     generator=generator, device=self.device)
        flip = torch.rand(n, device=self.device, generator=generator) < 0.5
        src = self.data.index_select(0, idx).float().div_(255.0)  # ToTensor
        x = resized_crop(src, top, left, h, w, self.size, flip=flip)
        return x.sub_(self.mean).div_(self.std)  # Normalize, as torchvision computes it
