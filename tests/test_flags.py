"""Every flag of the released entry scripts exists with the released name and default
(docs/released-behaviour.md), and the help lists it with its default."""
import re
import subprocess
import sys
from pathlib import Path

import pytest

import eval_linear
import eval_semisup
import main_swav_unmix

REPO = Path(__file__).resolve().parents[1]

RELEASED_PRETRAIN = {
    "data_path": "/path/to/data", "nmb_crops": [2], "size_crops": [32], "min_scale_crops": [0.14],
    "max_scale_crops": [1], "use_pil_blur": True, "crops_for_assign": [0, 1], "temperature": 0.1,
    "epsilon": 0.05, "improve_numerical_stability": False, "sinkhorn_iterations": 3, "feat_dim": 128,
    "nmb_prototypes": 3000, "queue_length": 0, "epoch_queue_starts": 15, "epochs": 100, "batch_size": 64,
    "base_lr": 4.8, "final_lr": 0, "freeze_prototypes_niters": 313, "wd": 1e-6, "warmup_epochs": 10,
    "start_warmup": 0, "dist_url": "env://", "world_size": -1, "rank": 0, "local_rank": 0,
    "arch": "resnet50", "hidden_mlp": 2048, "workers": 10, "checkpoint_freq": 25, "use_fp16": True,
    "sync_bn": "pytorch", "syncbn_process_group_size": 8, "dump_path": ".", "seed": 31,
    "run_swav": False, "unmix_prob": 0.5, "unmix_beta": 1.0,
}
RELEASED_EVAL = {
    "dump_path": ".", "seed": 31, "workers": 20, "arch": "resnet50", "pretrained": "", "global_pooling": True,
    "use_bn": False, "epochs": 100, "batch_size": 32, "num_labels": 10, "crop_size": 32, "lr": 0.3, "wd": 1e-6,
    "nesterov": False, "scheduler_type": "cosine", "decay_epochs": [60, 80], "gamma": 0.1, "final_lr": 0,
    "dist_url": "env://", "world_size": -1, "rank": 0, "local_rank": 0,
}
# The script arguments of script_unmix_c10.sh parse to the released values.
C10 = ("--arch resnet18 --hidden_mlp 512 --data_path cifar10 --min_scale_crops 0.14 --max_scale_crops 1.0 "
       "--epochs 400 --batch_size 128 --base_lr 0.6 --final_lr 0.0006 --warmup_epochs 5 --size_crops 32 "
       "--nmb_crops 2 --nmb_prototypes 100 --queue_length 120 --epoch_queue_starts 15 --use_fp16 True "
       "--freeze_prototypes_niters 5005 --run_swav False --workers 2 --temperature 0.1 --epsilon 0.05")


@pytest.mark.parametrize("module,released", [(main_swav_unmix, RELEASED_PRETRAIN), (eval_linear, RELEASED_EVAL)])
def test_released_flags_and_defaults(module, released):
    args = vars(module.get_parser().parse_args([]))
    for name, default in released.items():
        assert name in args, f"--{name} missing"
        assert args[name] == default, f"--{name}: default {args[name]!r}, released {default!r}"


def test_new_flags_default_to_the_released_behaviour():
    a = main_swav_unmix.get_parser().parse_args([])
    assert (a.width_per_group, a.unmix_loss_form, a.knn_freq, a.compile, a.channels_last) == (64, "released", 0, False, False)
    assert a.augment == "released"  # the released PIL pipeline on every device; batched only when asked
    e = eval_linear.get_parser().parse_args([])
    assert (e.probe, e.width_per_group) == ("released", 64)


def test_c10_script_arguments_parse():
    a = main_swav_unmix.get_parser().parse_args(C10.split())
    assert (a.arch, a.hidden_mlp, a.batch_size, a.queue_length, a.freeze_prototypes_niters) == ("resnet18", 512, 128, 120, 5005)
    assert a.use_fp16 is True and a.run_swav is False


@pytest.mark.parametrize("value,expected", [("on", True), ("TRUE", True), ("1", True), ("Off", False), ("false", False), ("0", False)])
def test_boolean_spellings(value, expected):
    assert main_swav_unmix.get_parser().parse_args(["--run_swav", value]).run_swav is expected


def test_legacy_launcher_local_rank_spellings():
    p = main_swav_unmix.get_parser()
    assert p.parse_args(["--local_rank=3"]).local_rank == 3
    assert p.parse_args(["--local-rank=2"]).local_rank == 2  # torch.distributed.launch on torch 2.x


@pytest.mark.parametrize("script,released", [("main_swav_unmix.py", RELEASED_PRETRAIN), ("eval_linear.py", RELEASED_EVAL)])
def test_help_lists_every_released_flag(script, released):
    out = subprocess.run([sys.executable, str(REPO / script), "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    for name in released:
        assert f"--{name}" in out.stdout, name


@pytest.mark.parametrize("module", [main_swav_unmix, eval_linear, eval_semisup])
def test_help_shows_every_default(module):
    parser = module.get_parser()
    formatter = parser._get_formatter()
    for action in parser._actions:
        if action.dest == "help":
            continue
        assert action.help, f"{action.option_strings} has no help text"
        assert f"(default: {action.default})" in formatter._expand_help(action), action.option_strings


def test_entry_scripts_start_without_importing_torchvision():
    """`--help` and the one-line errors of bad input come before any torchvision transform is needed;
    importing torchvision costs ~2 s per process, so the entry scripts import it only where they build
    transforms."""
    code = ("import sys, main_swav_unmix, eval_linear, eval_semisup, hubconf; "
            "from src.runtime.logs import provenance; provenance('cpu', 1); "
            "print('torchvision' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize("argv,hint", [(["--width_per_grop", "8"], "did you mean --width_per_group?"),
                                       (["--knn-freq", "1"], "did you mean --knn_freq?")])
def test_a_mistyped_flag_names_the_flag_meant(argv, hint, capsys):
    """A typo in EXTRA_ARGS was `error: unrecognized arguments: --width_per_grop 8` and nothing more."""
    with pytest.raises(SystemExit) as stop:
        main_swav_unmix.get_parser().parse_args(argv)
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.count("\n") == 1 and hint in err, err


HELP_RUNNER = """
import contextlib, io, runpy, sys
for script in sys.argv[1:]:
    sys.argv = [script, "--help"]
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):
        runpy.run_path(script, run_name="__main__")
    print(f"==== {script}\\n{out.getvalue()}", end="")
"""


def _arguments_without_help(text):
    """The arguments of an argparse --help whose line has no help text (in its sections, not the description)."""
    lines, missing, in_sections = text.splitlines(), [], False
    for i, line in enumerate(lines):
        in_sections = in_sections or line in ("options:", "positional arguments:")
        alone = re.match(r"^  (-{0,2}\w[^ ]*(?: [^ ]+)*)$", line)
        if in_sections and alone and not (i + 1 < len(lines) and re.match(r"^ {6,}\S", lines[i + 1])):
            missing.append(alone.group(1))
    return missing


def test_every_command_explains_every_argument_in_its_help():
    """`--help` of every command of the repository (entry scripts, tools, benchmarks) gives each argument a
    line of help, one process for all of them (a torch import each would cost seconds)."""
    scripts = sorted(str(p.relative_to(REPO)) for pattern in ("*.py", "tools/*.py", "benchmarks/*.py")
                     for p in REPO.glob(pattern)
                     if re.search(r"parse_(args|given)\(", p.read_text()) and "__main__" in p.read_text())
    out = subprocess.run([sys.executable, "-c", HELP_RUNNER, *scripts], cwd=REPO, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    helps = dict(part.split("\n", 1) for part in out.stdout.split("==== ")[1:])
    assert set(helps) == set(scripts) and all(h.startswith("usage:") for h in helps.values()), out.stdout[:2000]
    assert {s: _arguments_without_help(h) for s, h in helps.items() if _arguments_without_help(h)} == {}
    assert _arguments_without_help("options:\n  --seed SEED\n  --n N       images\n") == ["--seed SEED"]
