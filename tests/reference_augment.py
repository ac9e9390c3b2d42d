"""Per-operation, per-sample forms of the torchvision transforms, for the tests of the batched
augmentation (src/data/augment.py): each one applies a single operation with its own factor or mask per
sample, so that it can be compared with torchvision's functional ops image by image, and its random
versions with torchvision's rates. The training path fuses these operations (GPUMultiCrop)."""
import torch

from src.data.augment import _blend_, _check_range, _hue, apply_color_jitter, rgb_to_grayscale, sample_color_jitter_params
from src.data.crops import _view4


def _per_sample(value, n, x):
    """A per-sample factor as a float tensor of shape (n,) on x's device (no host-to-device copy for a
    Python number)."""
    if isinstance(value, torch.Tensor):
        return value.to(device=x.device, dtype=torch.float32).expand(n)
    return torch.full((n,), float(value), dtype=torch.float32, device=x.device)


def _select(a, b, mask):
    """``b`` where the per-sample bool ``mask`` (n,) is true, else ``a`` (exact)."""
    return torch.lerp(a, b, _view4(mask).to(a.dtype))


def hflip(x, mask):
    """Mirror the samples where ``mask`` (bool, (n,)) is true."""
    return _select(x, x.flip(-1), mask)


def random_hflip(x, p=0.5, generator=None, return_mask=False):
    """``RandomHorizontalFlip(p)`` for every sample independently."""
    mask = torch.rand(x.shape[0], device=x.device, generator=generator) < p
    out = hflip(x, mask)
    return (out, mask) if return_mask else out


def grayscale(x, mask):
    """Replace the samples where ``mask`` is true by their (3-channel) grey image."""
    return _select(x, rgb_to_grayscale(x), mask)


def random_grayscale(x, p=0.2, generator=None, return_mask=False):
    """``RandomGrayscale(p)`` for every sample independently."""
    mask = torch.rand(x.shape[0], device=x.device, generator=generator) < p
    out = grayscale(x, mask)
    return (out, mask) if return_mask else out


def adjust_brightness(x, factor):
    """Per-sample ``F.adjust_brightness`` (blend with black)."""
    return (x * _view4(_per_sample(factor, x.shape[0], x))).clamp_(0.0, 1.0)


def adjust_contrast(x, factor):
    """Per-sample ``F.adjust_contrast`` (blend with the mean of the grey image)."""
    f = _per_sample(factor, x.shape[0], x)
    mean = rgb_to_grayscale(x).mean(dim=(-3, -2, -1), keepdim=True)
    return _blend_(x.clone(), mean * _view4(1.0 - f), f)


def adjust_saturation(x, factor):
    """Per-sample ``F.adjust_saturation`` (blend with the grey image)."""
    f = _per_sample(factor, x.shape[0], x)
    return _blend_(x.clone(), rgb_to_grayscale(x).mul_(_view4(1.0 - f)), f)


def adjust_hue(x, factor):
    """Per-sample ``F.adjust_hue`` on float RGB images in [0, 1] (factor in [-0.5, 0.5])."""
    return _hue(x, _per_sample(factor, x.shape[0], x))


def color_jitter(x, brightness=0.4, contrast=0.4, saturation=0.4, hue=0.1, p=0.8, generator=None,
                 return_params=False):
    """``RandomApply([ColorJitter(brightness, contrast, saturation, hue)], p)`` per sample."""
    params = sample_color_jitter_params(x.shape[0], brightness, contrast, saturation, hue, p,
                                        generator=generator, device=x.device)
    ops = (_check_range(brightness, "brightness") is not None, _check_range(contrast, "contrast") is not None,
           _check_range(saturation, "saturation") is not None,
           _check_range(hue, "hue", center=0.0, bound=(-0.5, 0.5)) is not None)
    out = apply_color_jitter(x, *params, ops=ops)
    return (out, params) if return_params else out


def normalize(x, mean, std):
    """``Normalize(mean, std)`` for a batch."""
    m = torch.as_tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    s = torch.as_tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return (x - m) / s
