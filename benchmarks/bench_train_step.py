"""Speed of the real pretraining loop (augmentation, Un-Mix draws, step with its non-finite guard, the
loop's checks), side by side, for the c10 configuration of script_unmix_c10.sh: resnet18 (Bottleneck,
2048-d), hidden_mlp 512, feat_dim 128, 100 prototypes, 2 crops of 32 px, batch 128, Un-Mix on.

    python benchmarks/bench_train_step.py                 # CUDA when present, else CPU
    python benchmarks/bench_train_step.py --configs eager compile cuda_graph compile+cuda_graph
    python benchmarks/bench_train_step.py --quick         # width 8, batch 16, a few iterations (smoke test)

Each configuration runs in its own process (torch.compile caches, CUDA graphs and memory pools, cuDNN's
autotuning as in a run of its own; a configuration that crashes costs only its row), built by
main_swav_unmix.py's own functions, running its `train_one_epoch` for windows of --iters iterations (each
window ends with the loop's meter read, a device sync). The processes are set up at the same time, then
take turns (A, B, C, A, B, C, ...: one runs while the others wait), so a ratio compares windows measured
side by side; a row gives the median window after the warm-up windows.

On CUDA each row also gives the GPU's busy time per iteration next to the wall time, over one more window
under torch.profiler: the union of the kernels' and copies' device intervals (overlaps count once); busy
close to wall means the loop is bound by the GPU, far below it by the host ("busy / wall" divides it by
the median unprofiled iteration: the profiler slows a host-bound loop). Each worker starts the profiler
once before its first CUDA graph is captured (torch.profiler._utils._init_for_cuda_graphs): otherwise a
graph's kernels can be missing from the trace, or its profiled replay can fail. "% of peak" divides the
forward + backward FLOPs per second (FlopCounterMode, an eager iteration) by the bf16 matmul speed measured
on the same card in the same call (8192^3, CUDA events). --quick runs the profiled window and the FLOP
count too (no kernel on the CPU: no busy time). Data: synthetic CIFAR-size images (--n), or --data_path.
Operation counts per iteration: benchmarks/count_ops.py.

With --deadline_s the driver ends on its own within that many seconds: a worker that has not answered in
time (a hang) is stopped and its row says so; with --ready_s, also one not set up by then (a compile still
running), so that the others keep the time to be measured. The table and the JSON are written as soon as
the timed windows are in, then again with the busy times and the peak.
"""
import argparse
import json
import os
import platform
import select
import statistics
import subprocess
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

C10 = ["--arch", "resnet18", "--hidden_mlp", "512", "--feat_dim", "128", "--nmb_prototypes", "100",
       "--min_scale_crops", "0.14", "--max_scale_crops", "1.0", "--size_crops", "32", "--nmb_crops", "2",
       "--base_lr", "0.6", "--final_lr", "0.0006", "--warmup_epochs", "5", "--epochs", "400",
       "--queue_length", "120", "--epoch_queue_starts", "15", "--use_fp16", "true",
       "--freeze_prototypes_niters", "5005", "--temperature", "0.1", "--epsilon", "0.05", "--download", "false",
       "--log_freq", "1000000"]
FAST = ["--augment", "batched", "--amp_dtype", "bfloat16", "--channels_last", "true"]

CONFIGS = {
    "released pipeline (PIL, 2 workers), fp16": ["--augment", "released", "--workers", "2"],
    "--augment batched, fp16": ["--augment", "batched"],
    "eager": FAST,
    "compile": FAST + ["--compile", "true"],
    "cuda_graph": FAST + ["--cuda_graph", "true"],
    "compile+cuda_graph": FAST + ["--compile", "true", "--cuda_graph", "true"],
}
TITLES = {"eager": "--augment batched, bf16, channels_last (eager)",
          "compile": "... + --compile", "cuda_graph": "... + --cuda_graph",
          "compile+cuda_graph": "... + --compile --cuda_graph"}
CUDA_ONLY = ("compile", "cuda_graph")
ITERS_PER_EPOCH = 50000 // 128  # 390: CIFAR's 50,000 training images, batch 128, drop_last


# ------------------------------------------------------------------ one configuration (worker process)

class Setup:
    """One configuration, built as main_swav_unmix.main() builds it; `window(n)` runs n real iterations."""

    def __init__(self, argv):
        import logging

        import numpy as np

        import main_swav_unmix as M
        self.M = M
        logger = logging.getLogger("bench")
        logger.addHandler(logging.NullHandler())
        logger.propagate = False
        self.args = args = M.get_parser().parse_args(argv)
        M.launch.init_distributed(args)
        if args.device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # as main_swav_unmix.set_up
        self.data = M.build_data(args, logger, M.StartVote())
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
        import itertools
        t0 = time.perf_counter()
        self.M.train_one_epoch(self.loop, self.epoch, 0, itertools.islice(self.stream(), n))
        return time.perf_counter() - t0

    def busy(self, n):
        """(wall seconds, GPU busy seconds) of one window of n iterations under torch.profiler."""
        from torch.profiler import ProfilerActivity, profile
        cuda = torch.cuda.is_available()  # --quick on the CPU: the same path, no kernel, busy None
        with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
            seconds = self.window(n)
        spans = [(e.time_range.start, e.time_range.end) for e in prof.events()
                 if e.device_type == torch.autograd.DeviceType.CUDA]
        return seconds, busy_seconds(spans)

    def flops_per_iteration(self):
        from torch.utils.flop_counter import FlopCounterMode
        crops = next(self.stream())
        with FlopCounterMode(display=False) as fc:  # an iteration with the prototypes trained
            self.method.step(crops, iteration=self.args.freeze_prototypes_niters)
        return fc.get_total_flops()


class _NoPreemption:
    requested = False
    signum = None


def busy_seconds(spans_us):
    """Seconds during which at least one of the (start, end) device intervals (microseconds) ran: their
    union. None when there is none (the profiler saw no kernel, rather than a busy time of 0)."""
    total, end = 0.0, None
    for a, b in sorted(spans_us):
        if end is None or a > end:
            total, end = total + (b - a), b
        elif b > end:
            total, end = total + (b - end), b
    return total / 1e6 or None


def worker(argv):
    """Serve one configuration: answers "window N", "busy N", "flops" on stdin with one JSON line each."""
    out = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # anything else printed goes to the worker's log, not into the protocol
    t0 = time.perf_counter()
    if torch.cuda.is_available():  # the profiler started once before any graph is captured (see above)
        from torch.profiler._utils import _init_for_cuda_graphs
        _init_for_cuda_graphs()
    setup = Setup(argv)
    setup.window(5)  # compiling, cuDNN's autotuning, a graph's capture: while the other processes set up too
    out.write(json.dumps({"ready": time.perf_counter() - t0}) + "\n")
    for line in sys.stdin:
        cmd, *rest = line.split()
        if cmd == "window":
            reply = {"seconds": setup.window(int(rest[0]))}
        elif cmd == "busy":
            seconds, busy = setup.busy(int(rest[0]))
            reply = {"seconds": seconds, "busy": busy}
        elif cmd == "flops":
            reply = {"flops": setup.flops_per_iteration()}
        else:
            break
        out.write(json.dumps(reply) + "\n")


# ------------------------------------------------------------------ the driver

class Worker:
    """A configuration's process; `ask(cmd)` returns its JSON reply, or None once it has failed (exited,
    or not answered within `timeout` seconds: then it is stopped). `command`: another process (tests)."""

    def __init__(self, name, argv, log_path, command=None):
        self.name, self.log_path, self.error = name, log_path, None
        self.log = open(log_path, "w")
        command = command or [sys.executable, os.path.abspath(__file__), "--worker", "--", *argv]
        self.proc = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log,
                                     text=True, cwd=ROOT)

    def read(self, timeout=None):
        if self.error:
            return None
        if timeout is not None and not select.select([self.proc.stdout], [], [], max(timeout, 0))[0]:
            self.proc.kill()
            self.proc.wait()
            self.error = "no reply by the deadline (stopped)"
            return None
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait()
            self.log.flush()
            with open(self.log_path) as f:
                tail = [ln.strip() for ln in f if ln.strip()]
            self.error = f"exit {self.proc.returncode}: {tail[-1][:200] if tail else 'no output'}"
            return None
        return json.loads(line)

    def ask(self, cmd, timeout=None):
        if self.error:
            return None
        try:
            self.proc.stdin.write(cmd + "\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            pass
        return self.read(timeout)

    def close(self, timeout=60):
        if self.proc.poll() is None:
            try:
                self.proc.stdin.close()
            except BrokenPipeError:
                pass
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.log.close()


def measured_bf16_tflops(n=8192, reps=20):
    """TFLOP/s of an n^3 bf16 matmul on this card (CUDA events, median of `reps` after a warm-up)."""
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        a @ b
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1000)
    return 2 * n ** 3 / statistics.median(times) / 1e12


def machine(cuda):
    cpu = platform.processor() or "?"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpu = torch.cuda.get_device_name(0) if cuda else "none"
    return f"GPU {gpu}; CPU {cpu} ({os.cpu_count()} cores); torch {torch.__version__}"


def measure(workers, iters, rounds, warmup, profiled, cuda, left, report):
    """Interleaved windows of every worker, handed to `report(times, busy, flops, peak)` as soon as they
    are in; then (`profiled`) one profiled window each and the FLOPs of an eager iteration, (`cuda`) the
    bf16 peak, and `report` again. `left(ready)`: seconds to the deadline (None: none), `ready`: the one for being set
    up; a worker that has not answered by then is stopped (its row says so)."""
    for w in workers:
        w.setup_s = (w.read(left(ready=True)) or {}).get("ready")
    for _ in range(warmup):
        for w in workers:
            w.ask(f"window {iters}", left())
    times = {w.name: [] for w in workers}
    for _ in range(rounds):
        for w in workers:  # interleaved: A, B, C, A, B, C, ...
            reply = w.ask(f"window {iters}", left())
            if reply:
                times[w.name].append(reply["seconds"])
    busy, flops, peak = {}, None, None
    report(times, busy, flops, peak)
    if not profiled:
        return
    for w in workers:
        reply = w.ask(f"busy {iters}", left())
        busy[w.name] = (reply["seconds"], reply["busy"]) if reply else None
    eager = [w for w in workers if not any(k in w.name for k in CUDA_ONLY)]
    if eager:
        flops = (eager[0].ask("flops", left()) or {}).get("flops")
    peak = measured_bf16_tflops() if cuda else None
    report(times, busy, flops, peak)


def table(names, workers, times, busy, flops, peak, iters, batch, profiled):
    """The markdown rows, and the JSON rows ({name, ms, ...}; "error" for a configuration that failed);
    `profiled`: with the busy-time and peak columns."""
    rows, records = [], []
    base = statistics.median(times[names[0]]) / iters if times[names[0]] else None
    for name, w in zip(names, workers):
        title = TITLES.get(name, name)
        if not times[name]:
            rows.append(f"| {title} | failed ({w.error or 'no timing'}) |" + " |" * (6 if profiled else 3))
            records.append({"name": name, "error": w.error or "no timing"})
            continue
        med = statistics.median(times[name]) / iters
        rec = {"name": name, "ms": 1000 * med, "images_per_s": batch / med, "s_per_epoch": med * ITERS_PER_EPOCH,
               "setup_s": w.setup_s, "windows_ms": [1000 * t / iters for t in times[name]]}
        cells = [f"{rec['ms']:.1f}", f"{rec['images_per_s']:,.0f}", f"{rec['s_per_epoch']:.1f}",
                 f"{base / med:.2f}x" if base else "—"]
        if profiled:
            wall, gpu = busy[name] if busy.get(name) else (None, None)
            rec["profiled_window_s"] = wall
            rec["gpu_busy_ms"] = None if gpu is None else 1000 * gpu / iters
            # over the unprofiled median: the profiler's own launch overhead slows a host-bound loop
            rec["gpu_busy_fraction"] = None if gpu is None else gpu / iters / med
            rec["peak_fraction"] = flops / med / (peak * 1e12) if flops and peak else None
            cells += ["—" if gpu is None else f"{rec['gpu_busy_ms']:.1f}",
                      "—" if gpu is None else f"{100 * rec['gpu_busy_fraction']:.0f} %",
                      "—" if rec["peak_fraction"] is None else f"{100 * rec['peak_fraction']:.1f} %"]
        rows.append(f"| {title} | " + " | ".join(cells) + " |")
        records.append(rec)
    return rows, records


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--iters", type=int, default=None, help="iterations per timed window")
    p.add_argument("--rounds", type=int, default=None, help="timed windows per configuration")
    p.add_argument("--warmup", type=int, default=None, help="warm-up windows per configuration")
    p.add_argument("--n", type=int, default=None, help="synthetic training images")
    p.add_argument("--data_path", default=None, help="real data instead (CIFAR folder or image folder)")
    p.add_argument("--configs", nargs="+", default=None, help="subset of: " + " | ".join(CONFIGS))
    p.add_argument("--quick", action="store_true", help="width 8, batch 16, a few iterations (a smoke test)")
    p.add_argument("--out", default=None, help="the markdown table (default benchmarks/results_train_step_*.md)")
    p.add_argument("--json", default=None, help="also the rows as JSON")
    p.add_argument("--deadline_s", type=float, default=None, help="end within this many seconds (see above)")
    p.add_argument("--ready_s", type=float, default=None, help="workers set up within this many seconds")
    p.add_argument("--log_dir", default=None, help="keep the workers' logs here (default: a temporary folder)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("argv", nargs="*", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        return worker(a.argv)
    t0 = time.perf_counter()
    cuda = torch.cuda.is_available() and not a.quick
    a.iters = a.iters or (3 if a.quick else (50 if cuda else 3))
    a.rounds = a.rounds or (2 if a.quick else (5 if cuda else 3))
    a.warmup = a.warmup if a.warmup is not None else (1 if a.quick else 2)
    names = a.configs or [n for n in CONFIGS if cuda or not any(k in n for k in CUDA_ONLY)]
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        p.error(f"unknown configuration {unknown[0]!r}; choose from: " + " | ".join(CONFIGS))
    a.out = a.out or os.path.join(ROOT, "benchmarks", f"results_train_step_{'cuda' if cuda else 'cpu'}"
                                  f"{'_quick' if a.quick else ''}.md")
    reserve = 10.0  # seconds kept for the peak matmul and the files

    def left(ready=False):
        ends = ([] if a.deadline_s is None else [a.deadline_s - reserve]) + ([a.ready_s] if ready and a.ready_s
                                                                            is not None else [])
        return min(ends) - (time.perf_counter() - t0) if ends else None

    records = []

    def report(times, busy, flops, peak):
        records[:] = write_report(a, names, workers, times, busy, flops, peak, cuda)

    with tempfile.TemporaryDirectory() as tmp:
        data = a.data_path
        if data is None:
            from tools.synthetic_cifar import write_cifar10
            n = a.n or (400 if a.quick else 10000)
            data = write_cifar10(os.path.join(tmp, "data"), n_train_per_batch=n // 5, n_test=20)
        logs = a.log_dir or tmp
        os.makedirs(logs, exist_ok=True)
        size = ["--width_per_group", "8", "--batch_size", "16"] if a.quick else ["--batch_size", "128"]
        workers = [Worker(name, C10 + size + CONFIGS[name] + ["--data_path", str(data), "--dump_path",
                                                              os.path.join(tmp, f"run{i}")],
                          os.path.join(logs, f"worker{i}_{name.replace(' ', '_')[:40]}.log"))
                   for i, name in enumerate(names)]
        try:
            measure(workers, a.iters, a.rounds, a.warmup, cuda or a.quick, cuda, left, report)
        finally:
            for w in workers:  # within the deadline's reserve: a worker stuck on the device is killed
                w.close(60 if a.deadline_s is None else max(1.0, left() + reserve / 2))
    print(f"written to {a.out}")
    return 1 if any("error" in r for r in records) else 0


def write_report(a, names, workers, times, busy, flops, peak, cuda):
    """The markdown table (printed, and written to --out) and the JSON rows (--json); returns the rows."""
    batch = 16 if a.quick else 128
    rows, records = table(names, workers, times, busy, flops, peak, a.iters, batch, cuda or a.quick)
    head = "| configuration | ms / iteration | images/s | s per epoch (390 iterations) | speed-up |"
    sep = "|---|---:|---:|---:|---:|"
    if cuda or a.quick:  # --quick: the busy and FLOP paths run too (a smoke test of them)
        head += " GPU busy ms / iteration | GPU busy / wall | % of measured bf16 peak |"
        sep += "---:|---:|---:|"
    measured = (" Measured bf16 matmul peak of this card: " + ("not yet measured" if peak is None else
                                                              f"{peak:.0f} TFLOP/s")
                + (f"; {flops / 1e12:.3f} TFLOP per iteration (FlopCounterMode)." if flops else "."))
    lines = [f"Machine: {machine(cuda)}",
             f"Command: python benchmarks/bench_train_step.py {' '.join(sys.argv[1:])}".rstrip(),
             f"Each configuration in its own process; median of {a.rounds} interleaved windows of {a.iters} "
             f"iterations after {a.warmup} warm-up windows each; batch {batch}; "
             f"{'width 8 (quick)' if a.quick else 'full width'}; {'CUDA' if cuda else 'CPU'}. Epoch time from "
             "the median iteration (kNN monitor and checkpoint not included)."
             + (" On the CPU mixed precision is off (--use_fp16 applies on CUDA only)." if not cuda else measured),
             "", head, sep, *rows]
    text = "\n".join(lines)
    print(text, flush=True)
    with open(a.out, "w") as f:
        f.write(text + "\n")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"cuda": cuda, "peak_tflops": peak, "flops_per_iteration": flops, "rows": records}, f,
                      indent=1)
    return records


if __name__ == "__main__":
    sys.exit(main())
