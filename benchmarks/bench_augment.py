"""Augmentation throughput: the released PIL pipeline vs the batched on-device path (src/data/augment.py).

Images/s where one image = all its multi-crops (2 crops of 32 px, the CIFAR recipe):

(a) released pipeline: torchvision transforms on PIL images (RandomResizedCrop, flip, RandomApply
    ColorJitter, RandomGrayscale, ToTensor, Normalize), two crops per image, through a DataLoader with N
    workers (batch 128, drop_last) over a synthetic uint8 CIFAR-size array; "per process" divides by the
    number of processes that augment (the main process when N = 0, else N workers);
(b) ``GPUMultiCrop`` on the same array kept on the device (cpu, or cuda when available), batch 128 and
    512; on the CPU with 1 thread (per-core comparison) and with torch's default thread count.

Median of several timed repeats after a warm-up; on CUDA, CUDA events and a synchronise. Writes the table
with the machine description to ``benchmarks/results_augment_<device>.md``.

    python benchmarks/bench_augment.py            # full run (a few minutes on 2 CPU cores)
    python benchmarks/bench_augment.py --quick    # a few seconds
"""
import argparse
import os
import platform
import statistics
import sys
import time

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from src.data.augment import GPUMultiCrop  # noqa: E402
from src.data.constants import CIFAR_MEAN, PRETRAIN_STD
from src.data.sampling import DistributedBatchSampler

# ------------------------------------------------------------------ the released (PIL) pipeline

class _PILMultiCropDataset(torch.utils.data.Dataset):
    """The released MultiCropDataset on an in-memory uint8 array: PIL image -> list of crops."""

    def __init__(self, data, size_crops=(32,), nmb_crops=(2,), min_scale=(0.14,), max_scale=(1.0,)):
        import torchvision.transforms as T
        self.data = data
        trans = []
        for s, k, lo, hi in zip(size_crops, nmb_crops, min_scale, max_scale):
            t = T.Compose([
                T.RandomResizedCrop(s, scale=(lo, hi)),
                T.RandomHorizontalFlip(p=0.5),
                T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
                T.RandomGrayscale(p=0.2),
                T.ToTensor(),
                T.Normalize(mean=CIFAR_MEAN, std=PRETRAIN_STD),
            ])
            trans.extend([t] * k)
        self.trans = trans

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        from PIL import Image
        img = Image.fromarray(self.data[i])
        return [t(img) for t in self.trans]


def bench_pil(data, workers, batch_size, n_batches, repeats, warmup_batches):
    """Images/s of the PIL pipeline through a DataLoader (median over `repeats` windows)."""
    ds = _PILMultiCropDataset(data)
    sampler = torch.utils.data.DistributedSampler(ds, num_replicas=1, rank=0, shuffle=True, seed=0)
    loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, sampler=sampler, num_workers=workers,
                                         drop_last=True, pin_memory=False,
                                         persistent_workers=workers > 0)
    needed = warmup_batches + repeats * n_batches
    assert needed <= len(loader), f"need {needed} batches, the loader has {len(loader)} (raise --n)"
    it = iter(loader)
    for _ in range(warmup_batches):
        next(it)
    rates, cpu_rates = [], []
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        for _ in range(n_batches):
            next(it)
        rates.append(n_batches * batch_size / (time.perf_counter() - t0))
        cpu_rates.append(n_batches * batch_size / max(time.process_time() - c0, 1e-9))
    del it, loader
    # CPU time of this process only means something when it does the work (0 workers)
    return statistics.median(rates), (statistics.median(cpu_rates) if workers == 0 else None)


# ------------------------------------------------------------------ the batched path

def bench_batched(data, device, batch_size, n_batches, repeats, warmup_batches):
    """Images/s of GPUMultiCrop (median over `repeats` windows of `n_batches` calls)."""
    images = torch.from_numpy(data).to(device)
    mc = GPUMultiCrop(images, [32], [2], [0.14], [1.0])
    sampler = DistributedBatchSampler(len(data), batch_size, device=device)
    g = torch.Generator(device=device)
    g.manual_seed(0)
    batches = list(iter(sampler))
    needed = warmup_batches + repeats * n_batches
    batches = (batches * (needed // len(batches) + 1))[:needed]
    for b in batches[:warmup_batches]:
        mc(b, generator=g)
    cuda = torch.device(device).type == "cuda"
    rates, cpu_rates = [], []
    pos = warmup_batches
    for _ in range(repeats):
        if cuda:
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        t0, c0 = time.perf_counter(), time.process_time()
        for b in batches[pos:pos + n_batches]:
            crops = mc(b, generator=g)
        if cuda:
            end.record()
            torch.cuda.synchronize()
            seconds = start.elapsed_time(end) / 1000.0
        else:
            seconds = time.perf_counter() - t0
            cpu_rates.append(n_batches * batch_size / max(time.process_time() - c0, 1e-9))
        pos += n_batches
        rates.append(n_batches * batch_size / seconds)
        del crops
    return statistics.median(rates), (statistics.median(cpu_rates) if cpu_rates else None)


# ------------------------------------------------------------------ machine description

def machine_description(device):
    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    import torchvision
    lines = [f"- CPU: {cpu}, {os.cpu_count()} logical cores visible, torch threads {torch.get_num_threads()}",
             f"- torch {torch.__version__}, torchvision {torchvision.__version__}, Python {platform.python_version()}"]
    if torch.device(device).type == "cuda":
        lines.append(f"- device: {torch.cuda.get_device_name(device)}")
    else:
        lines.append("- device: cpu (no GPU used)")
    try:
        load = os.getloadavg()
        lines.append(f"- load average at the end: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} "
                     "(the CPU is shared: timings are noisy)")
    except OSError:
        pass
    return "\n".join(lines)


def report_text(rows, device, n, repeats, cmd):
    """The Markdown table of `rows` (path, setting, images/s, per process, per CPU-second or None)."""
    base = [r for r in rows if r[0].startswith("released")]
    base_pp = max(r[3] for r in base)
    base_cpu = [r[4] for r in base if r[4] is not None]
    base_cpu = max(base_cpu) if base_cpu else None
    out = [f"# Augmentation throughput ({device})", "",
           f"Command: `{cmd.strip()}`", "",
           "One image = its 2 crops of 32 px (the CIFAR recipe: `--size_crops 32 --nmb_crops 2 "
           "--min_scale_crops 0.14 --max_scale_crops 1`); synthetic uint8 data of CIFAR size "
           f"({n} images); median of {repeats} repeats after a warm-up.", "",
           machine_description(device), "",
           "| path | setting | images/s (wall) | per process | vs best PIL per process "
           "| images per CPU-second | vs PIL per CPU-second |",
           "|---|---|---:|---:|---:|---:|---:|"]
    for path, setting, rate, pp, cpu in rows:
        cpu_s = f"{cpu:,.0f}" if cpu is not None else "-"
        cpu_x = f"{cpu / base_cpu:.1f}x" if cpu is not None and base_cpu else "-"
        out.append(f"| {path} | {setting} | {rate:,.0f} | {pp:,.0f} | {pp / base_pp:.1f}x | {cpu_s} | {cpu_x} |")
    out += ["", "Per process: the PIL pipeline's images/s divided by the processes that augment (the main "
            "process with 0 workers, else the workers); the batched path runs in the training process "
            "(on the CPU with the stated number of torch threads). Images per CPU-second: images divided "
            "by the CPU time of the measuring process (only where that process does all the work); it is "
            "the per-core figure and is far less sensitive than wall time to other jobs on a shared "
            "machine."]
    return "\n".join(out) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=50000, help="synthetic images (CIFAR training split size)")
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2], help="DataLoader workers of (a)")
    p.add_argument("--batch_sizes", type=int, nargs="+", default=[128, 512], help="batches of (b)")
    p.add_argument("--repeats", type=int, default=5, help="timed repeats per row, the median is reported")
    p.add_argument("--device", default=None, help="device of (b): default cuda when available, else cpu")
    p.add_argument("--quick", action="store_true", help="tiny run (a few seconds)")
    p.add_argument("--out", default=None, help="table file (default benchmarks/results_augment_<device>.md)")
    args = p.parse_args(argv)

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.quick:
        args.n, args.repeats = min(args.n, 4096), 3
        args.workers = [w for w in args.workers if w == 0] or [0]
        pil_batches, pil_warm, bat_images = 2, 1, 1024
    else:
        pil_batches, pil_warm, bat_images = 12, 4, 16384
    rng = np.random.default_rng(0)
    data = rng.integers(0, 256, size=(args.n, 32, 32, 3), dtype=np.uint8)
    default_threads = torch.get_num_threads()

    rows = []  # (path, setting, images/s, images/s per process, images per CPU-second or None)

    def show(row):
        cpu = f"{row[4]:10.0f}" if row[4] is not None else " " * 10
        print(f"{row[0]:36s} {row[1]:28s} {row[2]:9.0f} img/s {row[3]:9.0f}/process {cpu}/CPU-s", flush=True)

    for w in args.workers:
        rate, cpu_rate = bench_pil(data, w, 128, pil_batches, args.repeats, pil_warm + 2 * w)
        procs = max(w, 1)
        rows.append(("released PIL pipeline (DataLoader)", f"{w} workers, batch 128", rate, rate / procs,
                     cpu_rate))
        show(rows[-1])

    thread_settings = [None] if torch.device(device).type == "cuda" else sorted({1, default_threads})
    if args.quick and thread_settings != [None]:
        thread_settings = [1]
    for threads in thread_settings:
        if threads is not None:
            torch.set_num_threads(threads)
        for bs in args.batch_sizes:
            n_batches = max(1, bat_images // bs)
            rate, cpu_rate = bench_batched(data, device, bs, n_batches, args.repeats, max(2, n_batches // 4))
            setting = f"{device}, batch {bs}" + (f", {threads} thread{'s' if threads > 1 else ''}"
                                                 if threads is not None else "")
            rows.append(("batched GPUMultiCrop", setting, rate, rate, cpu_rate))
            show(rows[-1])
    torch.set_num_threads(default_threads)

    cmd = "python benchmarks/bench_augment.py " + " ".join(argv if argv is not None else sys.argv[1:])
    text = report_text(rows, device, args.n, args.repeats, cmd)
    print()
    print(text)
    path = args.out or os.path.join(ROOT, "benchmarks", f"results_augment_{torch.device(device).type}.md")
    if not args.quick or args.out:
        with open(path, "w") as f:
            f.write(text)
        print(f"written to {path}")
    return rows


if __name__ == "__main__":
    main()
