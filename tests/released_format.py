"""Files as the released code writes them, for the compatibility tests.

The released code ran on torch 1.x with NumPy 1 and pandas 1.x. Its checkpoint is
`{"epoch", "state_dict" (module.-prefixed), "optimizer" (SGD inside LARC), "amp" (apex's state)}`, and the
optimizer's learning rate is a NumPy float64 (it is set from a NumPy schedule each iteration); NumPy 1
pickles that scalar as `numpy.core.multiarray.scalar`. Its stats are a pandas DataFrame pickled after each
epoch (`stats0.pkl`; `tests/data/released_stats0_pandas1.pkl` was written by pandas 1.1.5).
"""
import io
import zipfile
from pathlib import Path

import numpy as np
import torch

RELEASED_STATS_PKL = Path(__file__).resolve().parent / "data" / "released_stats0_pandas1.pkl"
RELEASED_STATS_ROWS = [(0, 9.2575), (1, 9.0178), (2, 8.9012)]  # (epoch, loss) in that file

APEX_AMP_STATE = {"loss_scaler0": {"loss_scale": 65536.0, "unskipped": 0}}


def released_checkpoint(epoch, state_dict, optimizer_state, lr):
    """The released checkpoint dict: module.-prefixed weights, the optimizer state with NumPy float64
    learning rates, apex's loss-scaler state."""
    optimizer_state = {"state": optimizer_state["state"],
                       "param_groups": [dict(g, lr=np.float64(lr)) for g in optimizer_state["param_groups"]]}
    prefixed = {k if k.startswith("module.") else "module." + k: v for k, v in state_dict.items()}
    return {"epoch": epoch, "state_dict": prefixed, "optimizer": optimizer_state, "amp": APEX_AMP_STATE}


def save_like_numpy1(obj, path):
    """torch.save `obj`, then name the NumPy scalar constructor as NumPy 1 did (`numpy.core`, not
    `numpy._core`) inside the zip's pickle, as in a file the released code wrote."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    src = zipfile.ZipFile(io.BytesIO(buf.getvalue()))
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as out:
        for info in src.infolist():
            data = src.read(info)
            if info.filename.endswith("/data.pkl"):
                data = data.replace(b"numpy._core.multiarray\nscalar", b"numpy.core.multiarray\nscalar")
            out.writestr(info.filename, data)
