"""The released code's golden vectors (tests/data/golden/README.md) and the one rule every test uses to
compare against them or any other recorded float value.

The rule: two correct float32 implementations of the same arithmetic, summed in another order (another
CPU, kernel or thread count), differ by a small fraction of a tensor's scale, not of each value. So a
value is compared within an absolute tolerance proportional to the scale of the tensor it belongs to:
    sum:    |sum - sum_ref|        <= TOL["sum"]   * ||ref||
    norm:   | ||t|| - ||ref|| |    <= TOL["norm"]  * ||ref||
    entry:  |t_i - ref_i|          <= TOL["entry"] * max_j |ref_j|
    loss:   |loss - loss_ref|      <= TOL["loss"]  * |loss_ref|
TOL is MARGIN times the largest move of the released code itself between kernel paths (RELEASED_SPREAD).
A weight after an optimiser step is compared by its update (after - before), at the update's own scale:
at the weight's scale a step of lr * trust * ||p|| (6e-4 of the weight) would hide a wrong learning rate.
The update also carries the float32 rounding of the stored weight, up to one unit in the last place of
each entry (ulp(x) <= eps * |x|), which is added to its tolerance.
"""
import math
import os
from pathlib import Path

import torch

GOLDEN = Path(os.environ.get("UNMIX_GOLDEN")
              or Path(__file__).resolve().parent / "data" / "golden" / "unmix_swav_golden.pt")

EPS32 = torch.finfo(torch.float32).eps  # 2**-23: one ulp at 1.0
# The released code's largest difference from its own stored values when run with 1 or 2 threads, ATen's
# AVX2 kernels or oneDNN capped at AVX2 (measured on an Intel Xeon with AVX-512 and AMX against values
# stored on an AMD EPYC; tests/data/golden/README.md): relative to the tensor's norm for sums, to its
# largest stored entry for entries, relative for norms and the loss.
RELEASED_SPREAD = {"sum": 7.2e-5, "entry": 1.9e-5, "norm": 1.0e-5, "loss": 9.5e-8}
MARGIN = 4
TOL = {k: MARGIN * v for k, v in RELEASED_SPREAD.items()}
# A parameter whose exact gradient is zero (a Linear bias in front of BatchNorm) gets round-off only.
NOISE_NORM = 1e-6


def load_golden():
    if not GOLDEN.exists():
        raise FileNotFoundError(f"golden vectors not found at {GOLDEN} (UNMIX_GOLDEN names another copy)")
    return torch.load(GOLDEN, weights_only=True)


def loss_mismatch(loss, ref, what="loss"):
    """A message when `loss` differs from the recorded `ref` by more than TOL["loss"] relative, else None."""
    err = abs(float(loss) - float(ref))
    tol = TOL["loss"] * abs(float(ref))
    return None if err <= tol else f"{what}: {float(loss):.9g} vs {float(ref):.9g} (|diff| {err:.2e} > {tol:.2e})"


def entries_mismatch(actual, expected, what, scale=None, floor=None):
    """A message when some entry of `actual` differs from `expected` by more than TOL["entry"] times
    `scale` (default: the largest |expected|) plus `floor` (per entry, e.g. float32 rounding), else None."""
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    if a.shape != e.shape:
        return f"{what}: shape {tuple(a.shape)} vs {tuple(e.shape)}"
    if not e.numel():
        return None
    scale = e.abs().max().item() if scale is None else scale
    tol = TOL["entry"] * scale + (0.0 if floor is None else floor.double().cpu())
    over = (a - e).abs() - tol
    if not torch.isfinite(a).all() or (over > 0).any():
        i = int(torch.nan_to_num(over, nan=math.inf).flatten().argmax())
        return (f"{what}: entry {i} {a.flatten()[i].item():.9g} vs {e.flatten()[i].item():.9g} (tolerance "
                f"{TOL['entry']:.1e} x scale {scale:.3g}" + ("" if floor is None else " + rounding") + ")")
    return None


def summary_mismatches(t, ref, what, before=None):
    """Messages for each way tensor `t` departs from a golden summary `ref` ({shape, sum, norm, idx,
    values}). `before`: the tensor before the step, for weights and BN statistics after an iteration;
    then the update is compared at its own scale (module docstring)."""
    t = t.detach().double().cpu()
    if list(t.shape) != list(ref["shape"]):
        return [f"{what}: shape {list(t.shape)} vs {list(ref['shape'])}"]
    out = []
    norm = t.norm().item()
    if abs(norm - ref["norm"]) > TOL["norm"] * ref["norm"]:
        out.append(f"{what}: norm {norm:.9g} vs {ref['norm']:.9g}")
    idx, values = ref["idx"], ref["values"].double()
    if before is None:
        if abs(t.sum().item() - ref["sum"]) > TOL["sum"] * ref["norm"]:
            out.append(f"{what}: sum {t.sum().item():.9g} vs {ref['sum']:.9g} (tolerance {TOL['sum']:.1e} x "
                       f"norm {ref['norm']:.3g})")
        out.append(entries_mismatch(t.flatten()[idx], values, f"{what} (stored entries)"))
        return [m for m in out if m]
    before = before.detach().double().cpu().flatten()
    ref_update = values - before[idx]
    # float32 rounding of both stored weights: up to one ulp of each entry
    rounding = 2 * EPS32 * values.abs()
    update_scale = ref_update.abs().max().item()
    out.append(entries_mismatch(t.flatten()[idx] - before[idx], ref_update, f"{what} update (stored entries)",
                                scale=update_scale, floor=rounding))
    # The update's norm, estimated from the stored entries (all of them for small tensors)
    n, k = t.numel(), len(idx)
    update_norm = ref_update.norm().item() * math.sqrt(n / k) if k else 0.0
    sum_err = abs((t.sum() - before.sum()).item() - (ref["sum"] - before.sum().item()))
    sum_tol = TOL["sum"] * update_norm + 2 * EPS32 * before.abs().sum().item()
    if sum_err > sum_tol:
        out.append(f"{what}: update sum off by {sum_err:.3g} (tolerance {sum_tol:.3g})")
    return [m for m in out if m]
