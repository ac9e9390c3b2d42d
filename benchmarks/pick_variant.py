"""Which training-loop variant the GPU check's real run uses (benchmarks/gpu_check.sh, phase c): the
fastest row of the side-by-side table (bench_train_step.py --json) whose equality checks passed in the
CUDA tests' log (pytest -v lines "tests/test_cuda.py::NAME PASSED"). Eager is the reference: it needs no
check. Prints "NAME<TAB>FLAGS<TAB>WHY".

    python benchmarks/pick_variant.py BENCH_JSON PYTEST_LOG
"""
import json
import re
import sys

FAST = "--augment batched --amp_dtype bfloat16 --channels_last true"
FLAGS = {"eager": FAST, "compile": FAST + " --compile true", "cuda_graph": FAST + " --cuda_graph true",
         "compile+cuda_graph": FAST + " --compile true --cuda_graph true"}
# the tests that show a variant equal to eager under the run's settings (tests/test_cuda.py)
# (compile: equal to eager in fp32, and within bf16's rounding under the run's bf16 + channels_last)
COMPILED = ["test_compiled_step_equals_eager_and_does_not_sync",
            "test_compiled_fast_path_is_close_to_eager_and_does_not_sync"]
CHECKS = {
    "eager": [],
    "compile": COMPILED,
    "cuda_graph": [r"test_cuda_graph_replays_equal_eager\[bf16\]"],
    "compile+cuda_graph": COMPILED + [r"test_cuda_graph_replays_equal_eager\[bf16\]",
                                      "test_compiled_cuda_graph_replays_equal_compiled_eager"],
}


def passed_checks(log_text, variant):
    """True when every equality test of `variant` is reported PASSED in the pytest log."""
    return all(re.search(r"::" + name + r" PASSED", log_text) for name in CHECKS[variant])


def pick(rows, log_text):
    """(name, why) of the fastest timed variant whose checks passed; eager when none did."""
    timed = sorted((r for r in rows if r.get("name") in FLAGS and "error" not in r), key=lambda r: r["ms"])
    skipped = []
    for r in timed:
        if passed_checks(log_text, r["name"]):
            speed = f"{r['ms']:.1f} ms / iteration"
            why = (f"the fastest variant whose equality checks passed ({speed})" if CHECKS[r["name"]]
                   else f"the fastest variant, the reference: no check needed ({speed})")
            if skipped:
                why += "; faster but not shown equal: " + ", ".join(skipped)
            return r["name"], why
        skipped.append(r["name"])
    return "eager", "no timed variant passed its checks: eager, the reference"


def main():
    if len(sys.argv) != 3 or sys.argv[1] in ("-h", "--help"):
        print(__doc__.strip(), file=sys.stdout if sys.argv[1:2] in (["-h"], ["--help"]) else sys.stderr)
        sys.exit(0 if sys.argv[1:2] in (["-h"], ["--help"]) else 2)
    try:
        with open(sys.argv[1]) as f:
            rows = json.load(f)["rows"]
    except (OSError, ValueError, KeyError):
        rows = []
    try:
        with open(sys.argv[2]) as f:
            log_text = f.read()
    except OSError:
        log_text = ""
    name, why = pick(rows, log_text)
    print(f"{name}\t{FLAGS[name]}\t{why}")


if __name__ == "__main__":
    main()
