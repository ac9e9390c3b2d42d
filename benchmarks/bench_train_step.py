"""Images/s of one full Un-Mix + SwAV training step (forward of crops and mixtures, loss, backward, LARC
step) for the c10 configuration of script_unmix_c10.sh: resnet18 (Bottleneck, 2048-d), hidden_mlp 512,
feat_dim 128, 100 prototypes, 2 crops of 32 px, batch 128.

    python benchmarks/bench_train_step.py                 # CPU, or CUDA when present
    python benchmarks/bench_train_step.py --quick         # width 8, a few steps (smoke test)

Prints a Markdown table and writes it to benchmarks/results_train_step_<device>.md. "images/s" counts
training images (each = 2 crops + 1 mixture through the network). Median over --repeats timed steps after
--warmup steps; on CUDA timed with events after synchronisation.
"""
import argparse
import os
import platform
import statistics
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from src.larc import LARC  # noqa: E402
from src.resnet import build_model  # noqa: E402
from src.train_step import train_step  # noqa: E402
from src.unmix import SwavConfig, draw_unmix, pair_sizes  # noqa: E402


def machine():
    cpu = platform.processor() or "?"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    return f"CPU {cpu} ({os.cpu_count()} cores, torch threads {torch.get_num_threads()}), GPU {gpu}, torch {torch.__version__}"


def bench(device, width, batch, steps, warmup, amp_dtype=None, channels_last=False, compile_model=False,
          run_swav=False):
    torch.manual_seed(0)
    model = build_model("resnet18", normalize=True, hidden_mlp=512, output_dim=128, nmb_prototypes=100,
                        width_per_group=width).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = LARC(torch.optim.SGD(model.parameters(), lr=0.6, momentum=0.9, weight_decay=1e-6),
               trust_coefficient=0.001, clip=False)
    scaler = torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 and device.type == "cuda" else None
    step_model = torch.compile(model) if compile_model else model
    cfg = SwavConfig(crops_for_assign=[0, 1], nmb_crops=[2])
    rng = np.random.RandomState(31)
    crops = [torch.randn(batch, 3, 32, 32, device=device) for _ in range(2)]
    times = []
    for i in range(warmup + steps):
        draws = draw_unmix(rng, 1.0, 0.5, [] if run_swav else pair_sizes(crops))
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            start.record()
        t0 = time.perf_counter()
        train_step(step_model, opt, crops, draws, cfg, lr=0.6, iteration=10**6, freeze_prototypes_niters=0,
                   run_swav=run_swav, unmix_prob=0.5, scaler=scaler, autocast_dtype=amp_dtype,
                   channels_last=channels_last)
        if device.type == "cuda":
            end.record()
            torch.cuda.synchronize()
            dt = start.elapsed_time(end) / 1000
        else:
            dt = time.perf_counter() - t0
        if i >= warmup:
            times.append(dt)
    med = statistics.median(times)
    return batch / med, med, times


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--width", type=int, default=64, help="width_per_group (64 = the released model)")
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    device = torch.device(args.device)
    if args.quick:
        args.width, args.batch = 8, 16
    cuda = device.type == "cuda"
    repeats = args.repeats or (3 if args.quick else (50 if cuda else 5))
    warmup = args.warmup or (1 if args.quick else (10 if cuda else 2))
    configs = [("Un-Mix, float32", dict()), ("SwAV only, float32", dict(run_swav=True))]
    if cuda:
        torch.backends.cudnn.benchmark = True
        configs += [("Un-Mix, fp16 autocast + GradScaler", dict(amp_dtype=torch.float16)),
                    ("Un-Mix, bf16 autocast + channels_last", dict(amp_dtype=torch.bfloat16, channels_last=True)),
                    ("Un-Mix, bf16 + channels_last + torch.compile",
                     dict(amp_dtype=torch.bfloat16, channels_last=True, compile_model=True))]
    rows = []
    for name, kw in configs:
        ips, med, times = bench(device, args.width, args.batch, repeats, warmup, **kw)
        rows.append(f"| {name} | {args.batch} | {args.width} | {med * 1000:.1f} | {ips:,.1f} | "
                    f"{min(times) * 1000:.1f}–{max(times) * 1000:.1f} |")
        print(rows[-1], flush=True)
    table = "\n".join([
        f"Machine: {machine()}",
        f"Command: python benchmarks/bench_train_step.py {' '.join(sys.argv[1:])}".rstrip(),
        f"Median of {repeats} steps after {warmup} warm-up steps, device {device}.",
        "",
        "| configuration | batch | width_per_group | median step (ms) | images/s | range (ms) |",
        "|---|---|---|---|---|---|", *rows])
    print("\n" + table)
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                   f"results_train_step_{device.type}{'_quick' if args.quick else ''}.md")
    with open(out, "w") as f:
        f.write(table + "\n")
    print(f"written to {out}")


if __name__ == "__main__":
    main()
