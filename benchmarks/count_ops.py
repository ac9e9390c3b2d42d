"""Kernel launches and host reads per training iteration of the real pretraining loop.

Runs `main_swav_unmix.py` in this process twice, for E and E + 1 epochs, under a `TorchDispatchMode` that
counts every aten op (views excluded: they launch nothing) and every read of a tensor value on the host
(`_local_scalar_dense`, `is_nonzero`, `equal`: each one is a device-to-host synchronisation on CUDA). The
difference between the two runs, divided by the iterations of one epoch, is what one more epoch costs per
iteration: start-up work cancels out, the end-of-epoch work (stats, checkpoint) is spread over the epoch.
On a GPU each aten op is about one kernel launch, so this counts the host work the loop asks for; it
needs no GPU. Ops are attributed to a phase by the innermost source file of this project on the Python
stack (backward ops run in autograd's engine, without one).

    python benchmarks/count_ops.py                      # c10 settings (narrow), --augment batched
    python benchmarks/count_ops.py -- --run_swav true   # extra flags for main_swav_unmix.py
"""
import argparse
import collections
import contextlib
import io
import os
import sys
import tempfile

import torch
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

HOST_READS = {"_local_scalar_dense", "is_nonzero", "equal"}
PHASES = {  # project file -> phase
    "augment.py": "augmentation", "crops.py": "augmentation", "sampling.py": "augmentation",
    "transforms.py": "augmentation",
    "resnet.py": "forward", "sinkhorn.py": "sinkhorn", "unmix.py": "Un-Mix mixing", "swav.py": "loss",
    "larc.py": "optimiser", "train_step.py": "step (guard, other)", "guard.py": "step (guard, other)",
    "staging.py": "step (staged numbers)", "main_swav_unmix.py": "loop",
    "checkpoint.py": "checkpoint", "logs.py": "logging", "knn.py": "kNN",
}


class OpCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()    # phase -> aten ops
        self.reads = collections.Counter()  # phase -> host reads
        self.names = collections.Counter()  # op name -> count

    @staticmethod
    def phase():
        f = sys._getframe(2)
        while f is not None:
            name = os.path.basename(f.f_code.co_filename)
            if name in PHASES and f.f_code.co_filename.startswith(ROOT + os.sep):
                return PHASES[name]
            path = f.f_code.co_filename
            if path.endswith(os.path.join("torch", "autograd", "__init__.py")):
                return "backward"
            if os.sep + os.path.join("torch", "optim") + os.sep in path:
                return "optimiser"
            f = f.f_back
        return "backward / other"

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not func.is_view:
            phase = self.phase()
            self.ops[phase] += 1
            self.names[func.__name__] += 1
            if func.__name__.split(".")[0] in HOST_READS:
                self.reads[phase] += 1
        return out


def fake_cifar10(root, n_train):
    from tools.synthetic_cifar import write_cifar10
    write_cifar10(root, n_train_per_batch=n_train // 5, n_test=20)
    return root


def run_main(argv):
    import main_swav_unmix
    from src.data.crops import _log_ratio
    _log_ratio.cache_clear()  # both runs start alike: what is computed once per process counts in each
    old = sys.argv
    sys.argv = ["main_swav_unmix.py", *argv]
    counter = OpCounter()
    try:
        with contextlib.redirect_stdout(io.StringIO()), counter:
            main_swav_unmix.main(main_swav_unmix.StartVote())
    finally:
        sys.argv = old
        import logging
        for h in list(logging.getLogger("unmix").handlers):  # a second run in this process logs afresh
            h.close()
            logging.getLogger("unmix").removeHandler(h)
    return counter


def count(extra, epochs=1, batch=16, iters=50):
    """{phase: (ops per iteration, host reads per iteration)}, and the most frequent op names."""
    with tempfile.TemporaryDirectory() as tmp:
        data = fake_cifar10(os.path.join(tmp, "data"), batch * iters)
        common = ["--data_path", data, "--arch", "resnet18", "--width_per_group", "8", "--hidden_mlp", "64",
                  "--feat_dim", "16", "--nmb_prototypes", "100", "--batch_size", str(batch), "--workers", "0",
                  "--base_lr", "0.6", "--final_lr", "0.0006", "--warmup_epochs", "0", "--size_crops", "32",
                  "--nmb_crops", "2", "--min_scale_crops", "0.14", "--max_scale_crops", "1.0",
                  "--freeze_prototypes_niters", "0", "--log_freq", "1000000", "--checkpoint_freq", "1000000",
                  "--augment", "batched", "--download", "false", *extra]
        runs = []
        for e in (epochs, epochs + 1):
            runs.append(run_main(common + ["--epochs", str(e), "--dump_path", os.path.join(tmp, f"run{e}")]))
    a, b = runs
    table = {}
    for phase in set(a.ops) | set(b.ops):
        table[phase] = ((b.ops[phase] - a.ops[phase]) / iters, (b.reads[phase] - a.reads[phase]) / iters)
    names = collections.Counter({k: (b.names[k] - a.names[k]) / iters for k in b.names})
    return table, names


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--iters", type=int, default=50, help="iterations per epoch")
    p.add_argument("--top", type=int, default=0, help="also list the N most frequent ops")
    p.add_argument("extra", nargs="*", help="flags for main_swav_unmix.py (after --)")
    args = p.parse_args()
    torch.set_num_threads(1)
    table, names = count(args.extra, iters=args.iters)
    print(f"Per iteration of the real loop (main_swav_unmix.py, --augment batched {' '.join(args.extra)}), "
          f"counted over one more epoch of {args.iters} iterations on {torch.device('cpu')}:\n")
    print("| phase | aten ops | host reads |")
    print("|---|---:|---:|")
    for phase, (ops, reads) in sorted(table.items(), key=lambda kv: -kv[1][0]):
        if ops or reads:
            print(f"| {phase} | {ops:.1f} | {reads:.2f} |")
    print(f"| **total** | **{sum(v[0] for v in table.values()):.1f}** | "
          f"**{sum(v[1] for v in table.values()):.2f}** |")
    if args.top:
        print()
        for name, n in names.most_common(args.top):
            print(f"{n:8.1f}  {name}")


if __name__ == "__main__":
    main()
