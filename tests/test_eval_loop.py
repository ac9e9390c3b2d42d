"""The epoch loop both evaluations share (src/eval/loop.py): the per-iteration log lines of the linear
evaluation and of the fine-tuning, and the training epoch against the released loop written out."""
import argparse
import re

import pytest
import torch

from src.eval.loop import EvalLoop, TrainingLog, train_epoch
from src.runtime.logs import Clock


class Lines:
    def __init__(self):
        self.lines = []

    def info(self, line):
        self.lines.append(line)


def tiny_loop(rank=0, log_freq=2, batches=4):
    torch.manual_seed(0)
    linear = torch.nn.Linear(6, 3)
    data = [(torch.randn(5, 6), torch.randint(0, 3, (5,))) for _ in range(batches)]
    args = argparse.Namespace(rank=rank, log_freq=log_freq, device=torch.device("cpu"))
    return EvalLoop(args, linear, maxk=2, logger=Lines(), optimizer=torch.optim.SGD(linear.parameters(), lr=0.1,
                    momentum=0.9), train_loader=data, clock=Clock(1, batches))


def learning_rate(optimizer):
    return f"LR {optimizer.param_groups[0]['lr']:.4f}"


def test_the_log_lines_of_both_evaluations():
    scores, target = torch.tensor([[2.0, 1.0, 0.0], [0.0, 1.0, 2.0]]), torch.tensor([0, 1])
    loop = tiny_loop()
    log = TrainingLog(loop, 3, 4, learning_rate)
    for it in range(4):
        log.loaded()
        log.step(it, torch.tensor(0.5 + it), scores, target)
    assert log.meters.averages() == (2.0, 50.0, 100.0)
    eta = r"\tETA \d+:\d\d:\d\d"
    assert len(loop.logger.lines) == 2  # iterations 0 and 2 (--log_freq 2)
    assert re.fullmatch(r"Epoch\[3\] - Iter: \[2/4\]\tLoss 2\.5000 \(1\.5000\)\tPrec 50\.000 \(50\.000\)\tLR 0\.1000"
                        + eta, loop.logger.lines[1])
    timed = TrainingLog(loop, 0, 4, lambda o: "LR trunk 0.1\tLR head 0.2", timed=True)
    timed.loaded()
    timed.step(0, torch.tensor(1.0), scores, target)
    assert re.fullmatch(r"Epoch\[0\] - Iter: \[0/4\]\tTime \d\.\d{3} \(\d\.\d{3}\)\tData \d\.\d{3} \(\d\.\d{3}\)\t"
                        r"Loss 1\.0000 \(1\.0000\)\tPrec 50\.000 \(50\.000\)\tLR trunk 0\.1\tLR head 0\.2" + eta,
                        loop.logger.lines[2])
    timed.write(7, ["Loss (0.1234)", "Prec (12.500)"])  # the batched probe's line
    assert re.fullmatch(r"Epoch\[0\] - Iter: \[7/4\]\tLoss \(0\.1234\)\tPrec \(12\.500\)\tLR trunk 0\.1\tLR head 0\.2"
                        + eta, loop.logger.lines[3])


def test_only_rank_0_logs():
    loop = tiny_loop(rank=1, log_freq=1)
    train_epoch(loop, 0, loop.model, learning_rate)
    assert loop.logger.lines == []


def test_a_training_epoch_is_the_released_loop():
    loop, ref = tiny_loop(), tiny_loop()
    averages = train_epoch(loop, 0, loop.model, learning_rate)
    criterion, losses = torch.nn.CrossEntropyLoss(), []
    for inp, target in ref.train_loader:  # the released train(): one SGD step per batch
        output = ref.model(inp)
        loss = criterion(output, target)
        ref.optimizer.zero_grad()
        loss.backward()
        ref.optimizer.step()
        losses.append(loss.item())
    assert torch.equal(loop.model.weight, ref.model.weight) and torch.equal(loop.model.bias, ref.model.bias)
    assert averages[0] == pytest.approx(sum(losses) / len(losses), rel=1e-12)  # equal batches: the mean
    assert len(loop.logger.lines) == 2 and loop.logger.lines[0].startswith("Epoch[0] - Iter: [0/4]\tLoss ")


def test_a_finished_evaluation_says_its_epochs_in_words():
    from src.eval.finished import report_finished
    lines = []
    log = argparse.Namespace(info=lines.append)
    for epochs, words in ((1, "(1 epoch in 0:00:05)"), (100, "(100 epochs in 0:00:05)")):
        report_finished({"epochs": epochs, "seconds": 5, "best_top1": 50.0, "last_top1": 40.0}, "run", log)
        assert words in lines[-1] and "best top-1 50.0, last-epoch top-1 40.0" in lines[-1], lines[-1]
