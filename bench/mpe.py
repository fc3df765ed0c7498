"""Speed of the MPE sensitivities against laplace-torch, and of the LOO ground truth against a loop.

Digits, MLP 64-128-128-10 (ReLU), N = 1297 training points, prior precision δ = 10.
1. For every posterior source (Laplace KFAC, Laplace diagonal GGN, IVON, Adam): time to build the
   posterior and compute the predictive covariances V_i = J_i Σ J_iᵀ of all N training points plus
   the sensitivities (`mpe_scores`). Laplace sources are compared in the same run with laplace-torch's
   own routine on the same model and prior (`Laplace(..., hessian_structure="kron"|"diag").fit(loader)`
   then `_glm_predictive_distribution(x)`, the call the original MPE code uses), and with a
   straightforward per-example-Jacobian baseline (J_i from vmap(jacrev), then Σ J_iᵀ column by column
   through the same posterior). Also reports the largest relative difference between the covariances.
2. Ground truth: 200 examples retrained without (warm start, 10 epochs) by the retraining engine at
   once, against `fit` one model at a time (measured on a few models and extrapolated).
Last line: a JSON object with `speedup_vs_laplace_torch` per structure and the details.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time

import torch
from _common import add_device_arg, check_bench_device, peak_rss_mb, sync

from modelsense.core.functional import FunctionalModel
from modelsense.data import load_dataset
from modelsense.models import build_model
from modelsense.mpe import MPESettings, build_posterior, mpe_scores
from modelsense.mpe.ground_truth import true_loo_logits, true_loo_logits_loop
from modelsense.training import TrainConfig, fit

DELTA = 10.0
DEVICE = "cpu"  # set by --device


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def ours(source: str, model: FunctionalModel, data, optimizer=None, structure: str = "kfac", bs_jacs: int = 500):
    sync(DEVICE)
    start = time.perf_counter()
    post = build_posterior(source, model, data.x_train, data.y_train, prior_precision=DELTA, structure=structure,
                           optimizer=optimizer, n_train=data.n_train, chunk_size=bs_jacs)
    sync(DEVICE)
    t_post = time.perf_counter() - start
    res, V = mpe_scores(
        post, data.x_train, data.y_train, MPESettings("diag"), chunk_size=bs_jacs, return_covariance=True
    )
    sync(DEVICE)
    total = time.perf_counter() - start
    return post, V, {"posterior_s": round(t_post, 3), "total_s": round(total, 3)}


def jacobian_baseline(post, data, chunk: int = 128) -> tuple[torch.Tensor, float]:
    """V_i = J_i Σ J_iᵀ with explicit per-example Jacobians and Σ applied to their rows."""
    model = post.model
    sync(DEVICE)
    start = time.perf_counter()
    out = []
    for s in range(0, data.n_train, chunk):
        J = model.jacobians(post.mean, data.x_train[s : s + chunk], chunk_size=chunk)  # (n, C, P)
        n, C, P = J.shape
        S = post.covariance_mv(J.reshape(n * C, P).T)  # (P, nC)
        out.append(torch.einsum("ncp,pnd->ncd", J, S.reshape(P, n, C)))
    out = torch.cat(out)
    sync(DEVICE)
    return out, time.perf_counter() - start


def laplace_torch(module, data, structure: str):
    try:
        from laplace import Laplace
    except ImportError as exc:  # pragma: no cover - depends on the environment
        return None, {"error": f"laplace-torch not installed ({exc})"}


    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(data.x_train, data.y_train), batch_size=500)
    sync(DEVICE)
    start = time.perf_counter()
    la = Laplace(module, "classification", subset_of_weights="all", hessian_structure=structure, prior_precision=DELTA)
    la.fit(loader)
    sync(DEVICE)
    t_fit = time.perf_counter() - start
    covs = []
    for s in range(0, data.n_train, 500):
        _, f_var = la._glm_predictive_distribution(data.x_train[s : s + 500])
        covs.append(f_var.detach())
    sync(DEVICE)
    total = time.perf_counter() - start
    return torch.cat(covs), {"version": _version("laplace-torch"), "fit_s": round(t_fit, 3), "total_s": round(total, 3)}


def _version(dist: str) -> str:
    import importlib.metadata as md

    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return "?"


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def main(n_retrain: int = 200, loop_models: int = 20) -> dict:
    torch.manual_seed(0)
    data = load_dataset("digits")
    data = dataclasses.replace(data, **{k: getattr(data, k).to(DEVICE)
                                        for k in ("x_train", "y_train", "x_test", "y_test")})
    report: dict = {"device": DEVICE, "threads": torch.get_num_threads(), "n_train": data.n_train, "structures": {}}

    def train(optimizer: str, lr: float, epochs: int):
        module = build_model("mlp", data.input_shape, data.num_classes, seed=0)
        res = fit(module, data, TrainConfig(optimizer=optimizer, lr=lr, epochs=epochs, bs=64, delta=DELTA,
                                                 eval_every=0, device=DEVICE), progress=False)
        return res

    sgd = train("sgd", 0.05, 20)
    model = FunctionalModel(sgd.module)
    # warm-up (first-call costs of torch.func)
    build_posterior(
        "laplace", model, data.x_train[:64], data.y_train[:64], prior_precision=DELTA, structure="kfac"
    ).predictive_covariance(data.x_train[:8])

    speedups = {}
    for structure, lt_name in (("kfac", "kron"), ("diag", "diag")):
        post, V, row = ours("laplace", model, data, structure=structure)
        log(f"ours laplace-{structure}: {row}")
        V_jac, t_jac = jacobian_baseline(post, data)
        row["jacobian_baseline_s"] = round(t_jac, 3)
        row["speedup_vs_jacobian_baseline"] = round(t_jac / (row["total_s"] - row["posterior_s"]), 2)
        row["max_rel_diff_vs_jacobian_baseline"] = rel_diff(V, V_jac)
        V_lt, lt_row = laplace_torch(sgd.module, data, lt_name)
        row["laplace_torch"] = lt_row
        if V_lt is not None:
            row["speedup_vs_laplace_torch"] = round(lt_row["total_s"] / row["total_s"], 2)
            row["max_rel_diff_vs_laplace_torch"] = rel_diff(V, V_lt)
            speedups[structure] = row["speedup_vs_laplace_torch"]
            log(f"laplace-torch {lt_name}: {lt_row}, speedup {row['speedup_vs_laplace_torch']}x, "
                f"max rel diff {row['max_rel_diff_vs_laplace_torch']:.2e}")
        report["structures"][f"laplace-{structure}"] = row
    for source, lr in (("ivon", 0.1), ("adam", 1e-3)):
        res = train(source, lr, 5)
        ours(source, FunctionalModel(res.module), data, optimizer=res.optimizer)  # warm-up of the diagonal path
        _, _, row = ours(source, FunctionalModel(res.module), data, optimizer=res.optimizer)
        log(f"ours {source}: {row}")
        report["structures"][source] = row

    # ground truth: engine (all at once) vs one-by-one loop
    idx = torch.randperm(data.n_train, generator=torch.Generator().manual_seed(1))[:n_retrain]
    cfg = TrainConfig(lr=0.01, lrmin=0.0, epochs=10, bs=128, delta=DELTA, eval_every=0, device=DEVICE)
    params = {k: v.detach() for k, v in sgd.module.named_parameters()}

    def model_fn(seed: int):
        return build_model("mlp", data.input_shape, data.num_classes, seed=seed)

    # wall time and this process's CPU time (less sensitive to other load on a shared machine)
    cpu = time.process_time()
    _, _, t_engine = true_loo_logits(model_fn, data.x_train, data.y_train, idx, cfg, params, progress=False)
    cpu_engine = time.process_time() - cpu
    cpu = time.process_time()
    _, t_loop = true_loo_logits_loop(model_fn, data, idx[:loop_models], cfg, params)
    cpu_loop = (time.process_time() - cpu) / loop_models * n_retrain
    t_loop_all = t_loop / loop_models * n_retrain
    report["ground_truth"] = {
        "n_retrain": n_retrain,
        "epochs_retrain": cfg.epochs,
        "engine_s": round(t_engine, 2),
        "loop_s_extrapolated": round(t_loop_all, 2),
        "loop_models_timed": loop_models,
        "speedup_vs_loop": round(t_loop_all / t_engine, 2),
        "engine_cpu_s": round(cpu_engine, 2),
        "loop_cpu_s_extrapolated": round(cpu_loop, 2),
        "cpu_speedup_vs_loop": round(cpu_loop / cpu_engine, 2),
    }
    log(f"ground truth for {n_retrain}: engine {t_engine:.1f}s ({cpu_engine:.1f}s CPU), loop {t_loop_all:.1f}s "
        f"({cpu_loop:.1f}s CPU) (extrapolated from {loop_models})")
    report["speedup_vs_laplace_torch"] = speedups or "laplace-torch not installed; see jacobian baseline"
    report["peak_rss_mb"] = peak_rss_mb()
    return report


if __name__ == "__main__":
    args = add_device_arg(argparse.ArgumentParser(description=__doc__.splitlines()[0])).parse_args()
    DEVICE = check_bench_device(args.device)
    print(json.dumps(main()))
