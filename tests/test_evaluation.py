"""What the two evaluations share (src/eval/setup.py): their common flags, the checks of those flags, the
train/test loaders of each process, the ETA of the log lines, and resuming from the evaluation's
checkpoint. The set-up phase and stopping on a signal run in the end-to-end tests of both scripts
(tests/test_e2e.py, tests/test_eval_semisup.py)."""
import argparse
import time

import numpy as np
import pytest
import torch

import eval_linear
import eval_semisup
from src.data.transforms import LabeledDataset, eval_transforms
from src.eval.setup import check_shared_args, data_loaders, make_scheduler, resume_evaluation
from src.runtime import signals
from src.runtime.checkpoint import rng_state
from src.runtime.logs import Clock
from src.runtime.run_folder import FINE_TUNING, LINEAR

SHARED = ["dump_path", "seed", "data_path", "arch", "pretrained", "dist_url", "world_size", "rank", "local_rank",
          "width_per_group", "allow_mismatched_weights", "dist_timeout", "download", "log_freq"]


def definitions(parser):
    return {a.dest: (a.option_strings, a.default, a.type, a.help) for a in parser._actions}


def test_both_evaluations_define_the_shared_flags_alike():
    linear, semisup = definitions(eval_linear.get_parser()), definitions(eval_semisup.get_parser())
    for name in SHARED:
        assert linear[name] == semisup[name], name
    # the released scripts' one difference among them
    assert (linear["workers"][1], semisup["workers"][1]) == (20, 10)


def args_for(*argv):
    args = eval_semisup.get_parser().parse_args(["--arch", "resnet18", *argv])
    args.world_size, args.rank, args.device = 1, 0, torch.device("cpu")
    return args


@pytest.mark.parametrize("argv,kind,message", [
    (["--arch", "vgg"], LINEAR, "unknown --arch 'vgg'"),
    (["--epochs", "10001"], FINE_TUNING, "--epochs 10001 is more than 10000; a typo?"),
    (["--seed", "-1"], LINEAR, "--seed must be in [0, 2**32), got -1"),
    (["--crop_size", "0"], FINE_TUNING, "--crop_size must be at least 1, got 0"),
    (["--pretrained", "none.pth"], LINEAR, "--pretrained none.pth: no such file (pass '' to evaluate random weights)"),
    (["--pretrained", "none.pth"], FINE_TUNING, "(pass '' to fine-tune random weights)"),
])
def test_shared_checks_stop_with_one_line(argv, kind, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as stop:
        check_shared_args(args_for(*argv), kind)
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.count("\n") == 1 and message in err


@pytest.mark.parametrize("with_checkpoint, message", [
    (True, "--pretrained run is a folder, not a checkpoint file: pass run/checkpoint.pth.tar\n"),
    (False, "--pretrained run is a folder, not a checkpoint file, and holds no checkpoint.pth.tar (pass '' to "
            "evaluate random weights)"),
])
def test_a_folder_given_as_pretrained_names_its_checkpoint(with_checkpoint, message, capsys, tmp_path, monkeypatch):
    """--pretrained pointed at a run folder (the pretraining's --dump_path) is the likely slip: the line
    says it is a folder and names the checkpoint in it, not 'no such file'."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "run").mkdir()
    if with_checkpoint:
        (tmp_path / "run" / "checkpoint.pth.tar").write_bytes(b"weights")
    with pytest.raises(SystemExit) as stop:
        check_shared_args(args_for("--pretrained", "run"), LINEAR)
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.count("\n") == 1 and message in err, err


def test_good_shared_flags_pass():
    check_shared_args(args_for("--epochs", "10000", "--seed", str(2 ** 32 - 1)), LINEAR)


def labelled(n):
    images = torch.randint(0, 256, (n, 32, 32, 3), dtype=torch.uint8).numpy()
    labels = torch.arange(n) % 10
    train_tf, test_tf = eval_transforms(32)
    return LabeledDataset(images, labels.numpy(), train_tf), LabeledDataset(images, labels.numpy(), test_tf)


def test_each_process_trains_on_its_share_and_tests_on_everything():
    train_set, test_set = labelled(30)
    seen, tested = [], []
    for rank in (0, 1):
        args = argparse.Namespace(world_size=2, rank=rank, batch_size=4, workers=0, device=torch.device("cpu"))
        train_loader, test_loader = data_loaders(train_set, test_set, args)
        train_loader.sampler.set_epoch(3)
        seen.append(list(train_loader.sampler))
        tested.append(torch.cat([target for _, target in test_loader]).tolist())
        assert train_loader.worker_init_fn is None and not train_loader.pin_memory
    assert sorted(seen[0] + seen[1]) == list(range(30)) and len(seen[0]) == len(seen[1]) == 15
    assert tested[0] == tested[1] == [i % 10 for i in range(30)]  # the whole test split, in order, everywhere


def test_loader_workers_leave_stop_signals_to_the_main_process():
    train_set, test_set = labelled(8)
    args = argparse.Namespace(world_size=1, rank=0, batch_size=4, workers=1, device=torch.device("cpu"))
    train_loader, test_loader = data_loaders(train_set, test_set, args)
    assert train_loader.worker_init_fn is test_loader.worker_init_fn is signals.ignore_preemption_signals_in_worker
    assert len(next(iter(train_loader))[0]) == 4


def test_eta_from_the_time_per_iteration_since_the_start():
    clock = Clock(epochs=4, iterations_per_epoch=5, start_epoch=2)
    clock.start = time.time() - 40  # 40 s for the first 4 iterations of epoch 2: 10 s each
    assert clock.eta(2, 3) == "0:01:00"  # 6 iterations left
    assert clock.eta(3, 4) == "0:00:00"  # the last one


# ----------------------------------------------------------------------------------------------------------
# resuming an evaluation (one function for both)
# ----------------------------------------------------------------------------------------------------------

class Log:
    def __init__(self):
        self.lines = []

    def info(self, line):
        self.lines.append(line)


def classifier_and_optimiser(seed=0):
    torch.manual_seed(seed)
    linear = torch.nn.Linear(4, 3)
    optimizer = torch.optim.SGD(linear.parameters(), lr=0.3, momentum=0.9, weight_decay=1e-6)
    return linear, optimizer, make_scheduler(optimizer, "cosine", 10)


def write_evaluation_checkpoint(folder, epoch=3, best=41.5, rng=False):
    """A checkpoint as the evaluations write it, after `epoch` epochs of steps on a small classifier."""
    linear, optimizer, scheduler = classifier_and_optimiser(seed=1)
    for _ in range(epoch):
        optimizer.zero_grad()
        linear(torch.randn(8, 4)).square().mean().backward()
        optimizer.step()
        scheduler.step()
    ckpt = {"epoch": epoch, "state_dict": {"module." + k: v for k, v in linear.state_dict().items()},
            "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "best_acc": best}
    if rng:
        ckpt["rng"] = rng_state(np.random)
    torch.save(ckpt, folder / "checkpoint.pth.tar")
    return linear, optimizer, scheduler


def test_resume_without_a_checkpoint_starts_afresh(tmp_path):
    linear, optimizer, scheduler = classifier_and_optimiser()
    args = argparse.Namespace(dump_path=str(tmp_path))
    assert resume_evaluation(args, LINEAR, linear, optimizer, scheduler, Log(), no_best=0.0) == (0, 0.0, False)
    assert resume_evaluation(args, FINE_TUNING, linear, optimizer, scheduler, Log(), no_best=(0.0, 0.0)) == \
        (0, (0.0, 0.0), False)


def test_resume_restores_classifier_optimiser_schedule_and_numpy_stream(tmp_path):
    np.random.seed(5)
    saved, saved_optimizer, saved_scheduler = write_evaluation_checkpoint(tmp_path, best=[41.5, 90.0], rng=True)
    expected_draw = np.random.rand()
    np.random.seed(6)
    linear, optimizer, scheduler = classifier_and_optimiser()
    ddp_like = torch.nn.Module()
    ddp_like.module = linear  # DistributedDataParallel's attribute: unwrapped before loading
    log = Log()
    args = argparse.Namespace(dump_path=str(tmp_path))
    start, best, resumed = resume_evaluation(args, FINE_TUNING, ddp_like, optimizer, scheduler, log,
                                             no_best=(0.0, 0.0))
    assert (start, best, resumed) == (3, (41.5, 90.0), True)
    assert all(torch.equal(a, b) for a, b in zip(linear.state_dict().values(), saved.state_dict().values()))
    assert optimizer.param_groups[0]["lr"] == saved_optimizer.param_groups[0]["lr"] < 0.3
    assert torch.equal(optimizer.state[linear.weight]["momentum_buffer"],
                       saved_optimizer.state[saved.weight]["momentum_buffer"])
    assert scheduler.last_epoch == saved_scheduler.last_epoch == 3
    assert np.random.rand() == expected_draw
    assert log.lines[-1] == "Resumed fine-tuning from epoch 3 (best top-1 so far 41.5)"
    (tmp_path / "linear").mkdir()
    write_evaluation_checkpoint(tmp_path / "linear", epoch=2, best=12.25)
    args.dump_path = str(tmp_path / "linear")
    assert resume_evaluation(args, LINEAR, *classifier_and_optimiser(), log, no_best=0.0) == (2, 12.25, True)
    assert log.lines[-1] == "Resumed linear evaluation from epoch 2 (best top-1 so far 12.2)"


@pytest.mark.parametrize("kind,damage,message", [
    (LINEAR, "garbage", "cannot resume the linear classifier: no readable checkpoint in"),
    (FINE_TUNING, "garbage", "cannot resume the fine-tuning: no readable checkpoint in"),
    (LINEAR, "other_shape", "cannot resume the linear classifier (RuntimeError: Error(s) in loading state_dict for "
                            "Linear: size mismatch for weight: copying a param"),
    (FINE_TUNING, "no_scheduler", "cannot resume the fine-tuning (KeyError: 'scheduler'); use another --dump_path"),
    (LINEAR, "negative_epoch", "epoch -2 cannot be negative; move it away to start the evaluation afresh"),
])
def test_a_checkpoint_that_cannot_be_resumed_stops_with_one_line(tmp_path, capsys, kind, damage, message):
    write_evaluation_checkpoint(tmp_path, best=41.5 if kind == LINEAR else [41.5, 90.0])
    path = tmp_path / "checkpoint.pth.tar"
    if damage == "garbage":
        path.write_bytes(b"\x00not a checkpoint\n" * 20)
    else:
        ckpt = torch.load(path, weights_only=True)
        if damage == "other_shape":
            ckpt["state_dict"]["module.weight"] = torch.zeros(5, 4)
        elif damage == "no_scheduler":
            del ckpt["scheduler"]
        else:
            ckpt["epoch"] = -2
        torch.save(ckpt, path)
    linear, optimizer, scheduler = classifier_and_optimiser()
    with pytest.raises(SystemExit) as stop:
        resume_evaluation(argparse.Namespace(dump_path=str(tmp_path)), kind, linear, optimizer, scheduler, Log(),
                          no_best=0.0 if kind == LINEAR else (0.0, 0.0))
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.count("\n") == 1 and message in err, err
