"""A real model trains: a 2-layer GPT on CPython's bundled documentation text."""

import math

import torch

from microadam_dist.data import load_corpus
from microadam_dist.train import main


def unigram_entropy() -> float:
    counts = torch.bincount(load_corpus(), minlength=256).double()
    p = counts[counts > 0] / counts.sum()
    return float(-(p * p.log()).sum())  # 3.26 nats: the best loss without looking at context


def test_microadam_reaches_the_loss_adamw_reaches():
    micro, adamw = main(["--steps", "300", "--width", "64", "--context", "32", "--batch-size", "16",
                         "--lr-microadam", "1e-2", "--quiet"])
    assert micro.losses[0] > math.log(256) - 0.5  # it really started from scratch (5.55 nats)
    # the bar: a validation loss AdamW reaches in this budget, far below what byte frequencies give
    bar = unigram_entropy() - 0.4
    assert adamw.val_loss < bar
    assert micro.val_loss < bar, (micro.val_loss, adamw.val_loss)
    assert micro.val_loss < 1.1 * adamw.val_loss
    assert micro.state_bytes < adamw.state_bytes / 6
