"""Figures of training (matplotlib, Agg backend; arrays in, Figure out)."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.figure import Figure


def learning_curves(history: dict[str, list[float]], title: str = "") -> Figure:
    """Train/test loss and accuracy per epoch."""
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(9, 3.4))
    ep = history["epoch"]
    ax_loss.plot(ep, history["train_loss"], label="train")
    ax_loss.plot(ep, history["test_loss"], label="test")
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("NLL")
    ax_loss.set_yscale("log")
    ax_loss.legend()
    ax_acc.plot(ep, history["train_accuracy"], label="train")
    ax_acc.plot(ep, history["test_accuracy"], label="test")
    ax_acc.set_xlabel("epoch")
    ax_acc.set_ylabel("accuracy")
    ax_acc.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig
