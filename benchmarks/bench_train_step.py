"""Speed of the real pretraining loop (augmentation, Un-Mix draws, step with its non-finite guard, the
loop's checks), side by side, for the c10 configuration of script_unmix_c10.sh: resnet18 (Bottleneck,
2048-d), hidden_mlp 512, feat_dim 128, 100 prototypes, 2 crops of 32 px, batch 128, Un-Mix on.

    python benchmarks/bench_train_step.py            # CUDA when present, else CPU
    python benchmarks/bench_train_step.py --quick    # width 8, batch 16, a few iterations (smoke test)

The configurations are built by main_swav_unmix.py's own functions and run its `train_one_epoch` for
windows of --iters iterations (each window ends with the loop's meter read, a device sync), interleaved
(A, B, C, A, B, C, ...) after warm-up windows, so a ratio compares runs measured side by side. Each
table row gives the median window. "ops" and "host reads" count aten ops and reads of a tensor value on
the host per iteration in one extra window (see benchmarks/count_ops.py); on CUDA "% of bf16 peak" is the
model's forward + backward FLOPs per second over the H100/H200 dense bf16 figure (989 TFLOP/s).
Data: synthetic CIFAR-size images (--n), or --data_path for real ones.
"""
import argparse
import itertools
import logging
import os
import platform
import statistics
import sys
import tempfile
import time

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import main_swav_unmix as M  # noqa: E402
from benchmarks.count_ops import OpCounter  # noqa: E402

BF16_PEAK_TFLOPS = 989.0  # H100 / H200 SXM, dense bf16 (spec sheet)

C10 = ["--arch", "resnet18", "--hidden_mlp", "512", "--feat_dim", "128", "--nmb_prototypes", "100",
       "--min_scale_crops", "0.14", "--max_scale_crops", "1.0", "--size_crops", "32", "--nmb_crops", "2",
       "--base_lr", "0.6", "--final_lr", "0.0006", "--warmup_epochs", "5", "--epochs", "400",
       "--queue_length", "120", "--epoch_queue_starts", "15", "--use_fp16", "true",
       "--freeze_prototypes_niters", "5005", "--temperature", "0.1", "--epsilon", "0.05", "--download", "false",
       "--log_freq", "1000000"]

CONFIGS = {
    "released pipeline (PIL, 2 workers), fp16": ["--augment", "released", "--workers", "2"],
    "--augment batched, fp16": ["--augment", "batched"],
    "--augment batched, bf16, channels_last": ["--augment", "batched", "--amp_dtype", "bfloat16",
                                               "--channels_last", "true"],
    "--augment batched, bf16, channels_last, --compile": ["--augment", "batched", "--amp_dtype", "bfloat16",
                                                          "--channels_last", "true", "--compile", "true"],
    "--augment batched, bf16, channels_last, --cuda_graph": ["--augment", "batched", "--amp_dtype", "bfloat16",
                                                             "--channels_last", "true", "--cuda_graph", "true"],
}
CUDA_ONLY = ("--compile", "--cuda_graph")


class Setup:
    """One configuration, built as main_swav_unmix.main() builds it; `window(n)` runs n real iterations."""

    def __init__(self, argv, logger):
        self.args = args = M.get_parser().parse_args(argv)
        M.launch.init_distributed(args)
        self.data = M.build_data(args, logger)
        net = M.build_network(args, logger)
        self.method = M.build_method(args, net, self.data.iters_per_epoch, np.random.RandomState(args.seed))
        self.loop = M.Loop(args, self.data, self.method, guard=M.NonfiniteWatch(args, logger),
                           preempt=_NoPreemption(), save=None,
                           clock=M.Clock(args.epochs, self.data.iters_per_epoch), logger=logger)
        self.epoch, self.crops = 0, iter(())
        self.method.start_epoch(0, self.data.iters_per_epoch)

    def stream(self):
        """The loop's crops, epoch after epoch, made lazily (inside the timed window) as in a run."""
        while True:
            yield from self.crops
            self.epoch += 1
            self.method.start_epoch(self.epoch, self.data.iters_per_epoch)
            self.crops = self.data.epoch_crops(self.epoch, 0)

    def window(self, n):
        """Seconds for n iterations of train_one_epoch (its final meter read waits for the device)."""
        t0 = time.perf_counter()
        M.train_one_epoch(self.loop, self.epoch, 0, itertools.islice(self.stream(), n))
        return time.perf_counter() - t0

    def flops_per_iteration(self):
        from torch.utils.flop_counter import FlopCounterMode
        crops = next(self.stream())
        with FlopCounterMode(display=False) as fc:  # an iteration with the prototypes trained
            self.method.step(crops, iteration=self.args.freeze_prototypes_niters)
        return fc.get_total_flops()


class _NoPreemption:
    requested = False
    signum = None


def machine(device):
    cpu = platform.processor() or "?"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpu = torch.cuda.get_device_name(0) if device.type == "cuda" else "none"
    return f"GPU {gpu}; CPU {cpu} ({os.cpu_count()} cores); torch {torch.__version__}"


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--iters", type=int, default=None, help="iterations per timed window")
    p.add_argument("--rounds", type=int, default=None, help="timed windows per configuration")
    p.add_argument("--warmup", type=int, default=None, help="warm-up windows per configuration")
    p.add_argument("--n", type=int, default=None, help="synthetic training images")
    p.add_argument("--data_path", default=None, help="real data instead (CIFAR folder or image folder)")
    p.add_argument("--configs", nargs="+", default=None, help="subset of: " + " | ".join(CONFIGS))
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default=None)
    a = p.parse_args()
    cuda = torch.cuda.is_available() and not a.quick
    iters = a.iters or (3 if a.quick else (50 if cuda else 3))
    rounds = a.rounds or (2 if a.quick else (5 if cuda else 3))
    warmup = a.warmup if a.warmup is not None else (1 if a.quick else 2)
    names = a.configs or [n for n in CONFIGS if cuda or not any(flag in n for flag in CUDA_ONLY)]
    logger = logging.getLogger("bench")
    logger.addHandler(logging.NullHandler())
    logger.propagate = False

    with tempfile.TemporaryDirectory() as tmp:
        data = a.data_path
        if data is None:
            from tools.synthetic_cifar import write_cifar10
            n = a.n or (400 if a.quick else 10000)
            data = write_cifar10(os.path.join(tmp, "data"), n_train_per_batch=n // 5, n_test=20)
        size = (["--width_per_group", "8", "--batch_size", "16"] if a.quick else ["--batch_size", "128"])
        setups = {}
        for name in names:
            setups[name] = Setup(C10 + size + CONFIGS[name] + ["--data_path", str(data),
                                                                "--dump_path", os.path.join(tmp, "run")], logger)
            for _ in range(warmup):
                setups[name].window(iters)
        times = {name: [] for name in names}
        for _ in range(rounds):
            for name in names:  # interleaved: A, B, C, A, B, C, ...
                times[name].append(setups[name].window(iters))
        rows = []
        device = setups[names[0]].args.device
        batch = setups[names[0]].args.batch_size
        base = statistics.median(times[names[0]]) / iters
        for name in names:
            s = setups[name]
            med = statistics.median(times[name]) / iters
            counter = OpCounter()
            with counter:
                s.window(iters)
            ops = sum(counter.ops.values()) / iters
            reads = sum(counter.reads.values()) / iters
            peak = ""
            if device.type == "cuda":
                tflops = s.flops_per_iteration() / med / 1e12
                peak = f" {100 * tflops / BF16_PEAK_TFLOPS:.1f} % |"
            epoch = med * (50000 // batch)  # drop_last
            rows.append(f"| {name} | {med * 1000:.1f} | {batch / med:,.0f} | {epoch:.1f} | {base / med:.2f}x | "
                        f"{ops:.0f} | {reads:.2f} |{peak}")
            print(rows[-1], flush=True)
    head = "| configuration | ms / iteration | images/s | s per 50,000-image epoch | speed-up | ops | host reads |"
    sep = "|---|---:|---:|---:|---:|---:|---:|"
    if device.type == "cuda":
        head += " % of bf16 peak |"
        sep += "---:|"
    table = "\n".join([
        f"Machine: {machine(device)}",
        f"Command: python benchmarks/bench_train_step.py {' '.join(sys.argv[1:])}".rstrip(),
        f"Median of {rounds} interleaved windows of {iters} iterations after {warmup} warm-up windows each; "
        f"batch {batch}; {'width 8 (quick)' if a.quick else 'full width'}; device {device}. Epoch time from "
        "the median iteration (kNN monitor and checkpoint not included)."
        + (" On the CPU mixed precision is off (--use_fp16 applies on CUDA only)." if device.type == "cpu" else ""),
        "", head, sep, *rows])
    print("\n" + table)
    out = a.out or os.path.join(ROOT, "benchmarks", f"results_train_step_{device.type}{'_quick' if a.quick else ''}.md")
    with open(out, "w") as f:
        f.write(table + "\n")
    print(f"written to {out}")


if __name__ == "__main__":
    main()
