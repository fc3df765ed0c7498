"""Speed of the representation metrics against maintained / common implementations.

Run: .venv/bin/python bench/representations.py [--n 5000] [--d 512] [--repeats 3]

Compared in the same run, on the same float32 features (n x d, two correlated representations):
- unbiased (debiased) linear CKA: `modelsense.representations.unbiased_cka` (closed form in feature
  space, O(n d^2)) against torch-cka 0.21 (`torch_cka.CKA.compare` on one batch holding all n
  examples: n x n Gram matrices and tr(K L) by an n x n x n matrix product). If torch-cka is not
  installed (`pip install torch-cka tqdm`), a line-by-line equivalent of its `_HSIC` is timed instead
  and the JSON says so.
- linear CKA (biased HSIC): `linear_cka` against the common Gram-matrix implementation
  (K = X X^T, L = Y Y^T, centred by row/column means, <Kc, Lc> / (||Kc|| ||Lc||)), as in
  Kornblith et al.'s notebook and its many copies; torch-cka has no biased estimator. The ratio in
  the JSON is against the float64 baseline (same precision as ours; the notebook's numpy is
  float64); the float32 baseline is timed too, and its error is printed.
- G_ReLU-CKA kernel (`relu_kernel`, batched) against the original's one-row-at-a-time loop
  (Godfrey et al. 2022, `wreath_cka`), on n_relu examples of (C, H, W) = (32, 8, 8) features.

The last line printed is one JSON object with the speed-up ratios (baseline time / our time).
"""

from __future__ import annotations

import argparse
import json
import time
import warnings

import torch
from _common import add_device_arg, check_bench_device, peak_rss_mb, sync

from modelsense.representations import linear_cka, relu_kernel, unbiased_cka

DEVICE = "cpu"  # set by --device


def best_time(fn, repeats: int) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(repeats):
        sync(DEVICE)
        t0 = time.perf_counter()
        out = fn()
        sync(DEVICE)
        best = min(best, time.perf_counter() - t0)
    return best, out


def gram_linear_cka_baseline(x: torch.Tensor, y: torch.Tensor) -> float:
    """The common implementation: n x n Gram matrices centred by means."""

    def center(k):
        return k - k.mean(0, keepdim=True) - k.mean(1, keepdim=True) + k.mean()

    kc, lc = center(x @ x.T), center(y @ y.T)
    return float((kc * lc).sum() / (kc.norm() * lc.norm()))


def torch_cka_unbiased(x: torch.Tensor, y: torch.Tensor) -> tuple[float, str]:
    """torch-cka's CKA on one batch of all n examples (identity 'models' return the features)."""
    try:
        from torch.utils.data import DataLoader, TensorDataset
        from torch_cka import CKA
    except ImportError:
        return _torch_cka_style_hsic(x, y), "inline copy of torch-cka's _HSIC (torch-cka not installed)"

    class Features(torch.nn.Module):
        def __init__(self, which: int):
            super().__init__()
            self.which = which
            self.out = torch.nn.Identity()

        def forward(self, batch):
            return self.out(batch[:, self.which])

    loader = DataLoader(TensorDataset(torch.stack([x, y], dim=1), torch.zeros(len(x))), batch_size=len(x))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cka = CKA(Features(0), Features(1), "a", "b", model1_layers=["out"], model2_layers=["out"])
        cka.compare(loader, loader)  # its progress bar goes to stderr
    return float(cka.export()["CKA"][0, 0]), "torch-cka " + _version("torch-cka")


def _version(pkg: str) -> str:
    from importlib.metadata import version

    try:
        return version(pkg)
    except Exception:  # noqa: BLE001
        return "?"


def _torch_cka_style_hsic(x: torch.Tensor, y: torch.Tensor) -> float:
    def hsic(k, l):
        n = k.shape[0]
        ones = torch.ones(n, 1)
        r = torch.trace(k @ l)
        r += float(ones.t() @ k @ ones @ ones.t() @ l @ ones) / ((n - 1) * (n - 2))
        r -= float(ones.t() @ k @ l @ ones) * 2 / (n - 2)
        return float(r) / (n * (n - 3))

    k, l = x @ x.T, y @ y.T
    k.fill_diagonal_(0)
    l.fill_diagonal_(0)
    return hsic(k, l) / (hsic(k, k) ** 0.5 * hsic(l, l) ** 0.5)


def original_relu_kernel_loop(h: torch.Tensor) -> torch.Tensor:
    """The original's loop: for each j, max over channels of the spatial inner products with rows < j."""
    h = h.clone()
    d = [0, 2, 3]
    h -= h.mean(dim=d, keepdim=True)
    nrm = h.pow(2).sum(dim=d, keepdim=True).sqrt()
    h /= torch.where(nrm == 0, torch.ones_like(nrm), nrm)
    n = h.shape[0]
    k = torch.zeros(n, n, device=h.device)
    for j in range(1, n):
        k[:j, j], _ = (h[:j] * h[j]).sum(dim=(-2, -1)).max(dim=1)
    return k + k.T


def main() -> None:
    global DEVICE
    ap = add_device_arg(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    ap.add_argument("--n", type=int, default=5000)
    ap.add_argument("--d", type=int, default=512)
    ap.add_argument("--n-relu", type=int, default=1000)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    DEVICE = check_bench_device(args.device)
    torch.manual_seed(0)
    x = torch.randn(args.n, args.d)
    y = torch.relu(x @ torch.randn(args.d, args.d) / args.d**0.5 + 0.5 * torch.randn(args.n, args.d))
    x, y = x.to(DEVICE), y.to(DEVICE)
    print(f"threads={torch.get_num_threads()} n={args.n} d={args.d} (float32 inputs; ours computes in float64)")

    t_lin, v_lin = best_time(lambda: linear_cka(x, y), args.repeats)
    xd, yd = x.double(), y.double()
    t_lin_base, v_lin_base = best_time(lambda: gram_linear_cka_baseline(xd, yd), args.repeats)
    t_lin_b32, v_lin_b32 = best_time(lambda: gram_linear_cka_baseline(x, y), args.repeats)
    print(
        f"linear CKA    ours {t_lin:8.3f}s  gram baseline float64 {t_lin_base:8.3f}s  float32 {t_lin_b32:8.3f}s  "
        f"values {v_lin:.9f} {v_lin_base:.9f} {v_lin_b32:.9f}"
    )

    t_unb, v_unb = best_time(lambda: unbiased_cka(x, y), args.repeats)
    t_ref, (v_ref, ref_name) = best_time(lambda: torch_cka_unbiased(x, y), max(1, args.repeats - 1))
    print(f"unbiased CKA  ours {t_unb:8.3f}s  {ref_name} {t_ref:8.3f}s  values {v_unb:.6f} {v_ref:.6f}")

    h = torch.relu(torch.randn(args.n_relu, 32, 8, 8)).to(DEVICE)
    t_rk, k_ours = best_time(lambda: relu_kernel(h), args.repeats)
    t_rk_loop, k_loop = best_time(lambda: original_relu_kernel_loop(h), 1)
    err_rk = float((k_ours.float() - k_loop).abs().max())
    print(
        f"G_ReLU kernel ours {t_rk:8.3f}s  original loop {t_rk_loop:8.3f}s  (n={args.n_relu}, 32x8x8) max|diff| "
        f"{err_rk:.2e}"
    )

    print(
        json.dumps(
            {
                "n": args.n,
                "d": args.d,
                "device": DEVICE,
                "linear_cka_speedup": round(t_lin_base / t_lin, 2),
                "linear_cka_speedup_vs_float32_gram": round(t_lin_b32 / t_lin, 2),
                "unbiased_cka_speedup": round(t_ref / t_unb, 2),
                "relu_kernel_speedup": round(t_rk_loop / t_rk, 2),
                "linear_cka_seconds": round(t_lin, 4),
                "unbiased_cka_seconds": round(t_unb, 4),
                "linear_cka_baseline": "float64 gram matrices + mean centring (Kornblith-style)",
                "unbiased_cka_baseline": ref_name,
                "linear_cka_abs_diff": abs(v_lin - v_lin_base),
                "linear_cka_float32_gram_abs_diff": abs(v_lin - v_lin_b32),
                "unbiased_cka_abs_diff": abs(v_unb - v_ref),
                "relu_kernel_max_abs_diff": err_rk,
                "peak_rss_mb": peak_rss_mb(),
            }
        )
    )


if __name__ == "__main__":
    main()
