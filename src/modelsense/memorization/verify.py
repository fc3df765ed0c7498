"""Check a restored checkpoint against what it should reach, as the demo.py of Feldman & Zhang's released
checkpoints does: its accuracy on a split against an expected accuracy, and its per-example correctness
against the correctness a run recorded (`store.read_recorded_correctness`).

    correct = example_correctness(module, x, y)
    verification(correct, expected=0.9, tolerance=0.005, recorded=None) -> (metrics, failures)
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from modelsense.errors import ModelsenseError


class VerificationFailed(ModelsenseError):
    """A checkpoint did not reach the accuracy (or the recorded per-example correctness) it should."""


def example_correctness(module: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 200,
                        device: str = "cpu") -> np.ndarray:
    """(n,) bool: argmax module(x_i) == y_i, in eval mode without gradients, `batch_size` examples at a time."""
    from modelsense.core.functional import chunks

    module = module.to(device).eval()
    out = []
    with torch.no_grad():
        for sl in chunks(len(x), batch_size):
            out.append((module(x[sl].to(device)).argmax(-1).cpu() == y[sl].cpu()).numpy())
    return np.concatenate(out) if out else np.zeros(0, dtype=bool)


def verification(correct: np.ndarray, expected: float | None, tolerance: float, recorded: np.ndarray | None = None,
                 split: str = "test", source: str = "the record") -> tuple[dict[str, Any], list[str]]:
    """(metrics, failures) of per-example correctness `correct` (n,) bool against the `expected`
    accuracy (default: the accuracy of `recorded`) and, given `recorded` (n,) bool, the fraction of
    examples classified otherwise than recorded; a check fails when |accuracy - expected| or that
    fraction exceeds `tolerance`. `split`, `source`: named in the failures."""
    accuracy = float(correct.mean())
    expected = float(expected) if expected is not None else float(recorded.mean())
    metrics: dict[str, Any] = {"split": split, "n_examples": int(correct.size), "accuracy": accuracy,
                               "expected_accuracy": expected, "difference": accuracy - expected,
                               "tolerance": float(tolerance)}
    failures = []
    if abs(accuracy - expected) > tolerance:
        failures.append(f"accuracy {accuracy:.4f} on {split} differs from the expected {expected:.4f} by "
                        f"{abs(accuracy - expected):.4f} > --tolerance {tolerance:g}")
    if recorded is not None:
        n_match = int(np.count_nonzero(correct == recorded))
        metrics.update(recorded_accuracy=float(recorded.mean()), n_match=n_match,
                       mismatch_fraction=1.0 - n_match / correct.size)
        if metrics["mismatch_fraction"] > tolerance:
            failures.append(f"{correct.size - n_match} of {correct.size} examples are classified otherwise than "
                            f"{source} records (a fraction {metrics['mismatch_fraction']:.4f} > --tolerance "
                            f"{tolerance:g})")
    metrics["passed"] = not failures
    return metrics, failures


__all__ = ["VerificationFailed", "example_correctness", "verification"]
