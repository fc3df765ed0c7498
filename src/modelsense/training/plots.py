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


def learning_curves_compared(histories: dict[str, dict[str, list[float]]], title: str = "") -> Figure:
    """Test loss and accuracy per epoch of several runs, one line per run (label -> history)."""
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(9, 3.4))
    for label, history in histories.items():
        ax_loss.plot(history["epoch"], history["test_loss"], label=label)
        ax_acc.plot(history["epoch"], history["test_accuracy"], label=label)
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("test NLL")
    ax_loss.set_yscale("log")
    ax_acc.set_xlabel("epoch")
    ax_acc.set_ylabel("test accuracy")
    ax_acc.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig
