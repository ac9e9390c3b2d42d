"""Boolean flags, running averages, seeding."""
import argparse
import random

import numpy as np
import pytest
import torch

from src.runtime.cli import bool_flag
from src.runtime.logs import AverageMeter
from src.runtime.startup import fix_random_seeds


@pytest.mark.parametrize("text", ["on", "ON", "true", "True", "TRUE", "1", "tRuE", "On"])
def test_bool_flag_true(text):
    assert bool_flag(text) is True


@pytest.mark.parametrize("text", ["off", "OFF", "false", "False", "0", "fAlSe", "Off"])
def test_bool_flag_false(text):
    assert bool_flag(text) is False


@pytest.mark.parametrize("text", ["yes", "no", "", "2", "tru", "onn", " true", "-1", "None"])
def test_bool_flag_rejects(text):
    with pytest.raises(argparse.ArgumentTypeError):
        bool_flag(text)


def test_bool_flag_as_argparse_type(capsys):
    p = argparse.ArgumentParser()
    p.add_argument("--use_fp16", type=bool_flag, default=True)
    assert p.parse_args([]).use_fp16 is True
    assert p.parse_args(["--use_fp16", "OFF"]).use_fp16 is False
    with pytest.raises(SystemExit):
        p.parse_args(["--use_fp16", "maybe"])
    assert "invalid boolean value" in capsys.readouterr().err


def test_average_meter():
    m = AverageMeter()
    m.update(2.0)
    m.update(5.0, n=3)
    assert m.val == 5.0 and m.count == 4 and m.sum == 17.0
    assert m.avg == pytest.approx(17.0 / 4)


def test_fix_random_seeds_seeds_every_stream():
    def draw():
        return torch.rand(2), np.random.rand(2), random.random()

    fix_random_seeds(31)
    a = draw()
    fix_random_seeds(31)
    b = draw()
    fix_random_seeds(32)
    c = draw()
    assert torch.equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[2] == b[2]
    assert not torch.equal(a[0], c[0]) and not np.array_equal(a[1], c[1]) and a[2] != c[2]
