"""Which run may use a folder: the pretraining's claim (`claim_pretraining_folder`) and what it shares with
the evaluations' (`claim_evaluation_folder`): the lock, the kind of run a folder holds, the arguments
compared but for `OPERATIONAL_FLAGS`."""
import json

import pytest

import eval_linear
import eval_semisup
import main_swav_unmix
from src.runtime.cli import OPERATIONAL_FLAGS
from src.runtime.run_folder import FINE_TUNING, LINEAR, claim_evaluation_folder, claim_pretraining_folder, save_params


def pretraining_args(dump, *argv):
    args = main_swav_unmix.get_parser().parse_args(["--dump_path", str(dump), "--data_path", "cifar10", *argv])
    args.world_size, args.device = 1, "cpu"
    return args


def claim(dump, *argv):
    return claim_pretraining_folder(pretraining_args(dump, *argv), OPERATIONAL_FLAGS)


@pytest.fixture
def run(tmp_path):
    """The folder of a pretraining with the default arguments, unlocked."""
    dump = tmp_path / "run"
    lock, problem = claim(dump)
    assert problem is None and (dump / "checkpoints").is_dir()
    save_params(pretraining_args(dump), str(dump))
    lock.close()
    return dump


def test_a_pretraining_resumes_its_folder_with_other_operational_flags(run):
    lock, problem = claim(run, "--log_freq", "7", "--tensorboard", "true", "--workers", "1", "--dist_timeout", "9")
    assert problem is None and lock is not None
    lock.close()


def test_a_pretraining_with_other_arguments_is_refused_unless_allowed(run):
    lock, problem = claim(run, "--base_lr", "0.6", "--seed", "32")
    assert lock is None and "\n" not in problem
    assert problem.startswith(f"{run} holds a run with other arguments (base_lr: 4.8 -> 0.6; seed: 31 -> 32)")
    lock, problem = claim(run, "--base_lr", "0.6", "--allow_changed_args", "true")  # the refusal let go of the lock
    assert problem is None
    held, problem = claim(run)
    assert held is None and "is in use by another run" in problem
    lock.close()


def test_an_unreadable_params_json_is_refused_unless_allowed(run):
    (run / "params.json").write_text("{not json")
    lock, problem = claim(run)
    assert lock is None and "params.json is unreadable" in problem and "cannot check that" in problem
    lock, problem = claim(run, "--allow_changed_args", "true")
    assert problem is None
    lock.close()


def test_a_run_never_writes_into_another_kind_of_run(run, tmp_path):
    evaluation = tmp_path / "run_linear_eval"
    evaluation.mkdir()
    (evaluation / "params.json").write_text(json.dumps({"num_labels": 10, "pretrained": ""}))
    lock, problem = claim(evaluation, "--allow_changed_args", "true")
    assert lock is None and problem == (f"{evaluation} holds a linear evaluation run, not a pretraining: nothing "
                                        "was written there; use another --dump_path")
    assert not (evaluation / "checkpoints").exists()
    args = eval_linear.get_parser().parse_args(["--dump_path", str(run), "--pretrained", ""])
    lock, identity, moved, problem = claim_evaluation_folder(args, LINEAR, OPERATIONAL_FLAGS)
    assert lock is None and problem == (f"{run} holds a pretraining run, not a linear evaluation: nothing was "
                                        f"written there; use another --dump_path (e.g. {run}_linear_eval)")
    args = eval_semisup.get_parser().parse_args(["--dump_path", str(run), "--pretrained", "", "--labels_perc", "1"])
    problem = claim_evaluation_folder(args, FINE_TUNING, OPERATIONAL_FLAGS)[3]
    assert problem.endswith(f"use another --dump_path (e.g. {run}_semisup_1pct)")  # as the scripts name it
