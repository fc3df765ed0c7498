"""Benchmark of the curvature layer on a digits MLP 64-128-128-10 (float32, CPU threads as set).

Measures, in one run:
  1. KFAC predictive covariance J Σ Jᵀ for n = 2000 inputs: ours through the Kronecker factors
     against ours through per-example Jacobians (same Σ) and against laplace-torch (KFAC fit +
     GLM predictive), and the diagonal Laplace the same way;
  2. top-20 Hessian eigenvalues: ours (Lanczos, full reorthogonalisation) against PyHessian
     (power iteration with deflation) and curvlinops + scipy eigsh;
  3. trace: our Hutchinson (per probe) and Hutch++ (at equal standard error) against PyHessian's
     Hutchinson.
Peers that are not installed are skipped. Last line: a JSON object with times, accuracies and the
ratios peer time / our time.

Run: .venv/bin/python bench/curvature.py [--threads 2] [--skip-peers] [--skip-laplace-diag]
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
from _common import add_device_arg, check_bench_device, peak_rss_mb, sync
from sklearn.datasets import load_digits
from torch import nn

from modelsense.core.functional import FunctionalModel
from modelsense.curvature import Curvature, build_curvature, hutchinson_trace, hutchpp_trace, laplace

DEVICE = "cpu"  # set by --device
CPU_SECONDS: dict[str, float] = {}  # process CPU time of the last `timed` call per label


def timed(fn, repeat=1, label=None):
    """Best wall-clock time over `repeat` runs (and the CPU time of that run under `label`,
    which is steadier than wall time on a shared machine)."""
    best, out, cpu = float("inf"), None, float("inf")
    for _ in range(repeat):
        sync(DEVICE)
        t0, c0 = time.perf_counter(), time.process_time()
        out = fn()
        sync(DEVICE)
        wall, used = time.perf_counter() - t0, time.process_time() - c0
        if wall < best:
            best, cpu = wall, used
    if label:
        CPU_SECONDS[label] = cpu
    return best, out


def digits_mlp(seed=0, epochs=100):
    d = load_digits()
    x = torch.tensor(d.data, dtype=torch.float32)
    x = (x - x.mean(0)) / (x.std(0) + 1e-6)
    y = torch.tensor(d.target)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    x, y = x[perm], y[perm]
    x_train, y_train = x[:1297], y[:1297]
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10))
    opt = torch.optim.Adam(net.parameters(), lr=1e-3, weight_decay=1e-4)
    for _ in range(epochs):
        for s in torch.split(torch.randperm(len(x_train)), 128):
            opt.zero_grad()
            nn.functional.cross_entropy(net(x_train[s]), y_train[s]).backward()
            opt.step()
    net.eval()
    x_pred = torch.cat([x, x[: 2000 - len(x)]])  # n = 2000 inputs
    return net, x_train, y_train, x_pred


def main() -> None:
    global DEVICE
    parser = add_device_arg(argparse.ArgumentParser())
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--skip-peers", action="store_true")
    parser.add_argument("--skip-laplace-diag", action="store_true", help="laplace-torch's diag takes minutes")
    parser.add_argument("--k", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    DEVICE = check_bench_device(args.device)
    net, x, y, x_pred = digits_mlp()  # trained on the CPU, then moved
    net, x, y, x_pred = net.to(DEVICE), x.to(DEVICE), y.to(DEVICE), x_pred.to(DEVICE)
    fm = FunctionalModel(net)
    delta = 1.0
    res: dict = {
        "n_params": fm.n_params,
        "n_train": len(x),
        "n_predict": len(x_pred),
        "threads": args.threads,
        "device": DEVICE,
    }
    ratios: dict = {}

    # 1. predictive covariance -------------------------------------------------------------------
    t_fit, post = timed(
        lambda: laplace(fm, x, y, structure="kfac", prior_precision=delta), repeat=2, label="ours_kfac_fit"
    )
    t_kron, V_kron = timed(
        lambda: post.predictive_covariance(x_pred, chunk_size=500), repeat=2, label="ours_kfac_predictive"
    )
    t_jac, V_jac = timed(
        lambda: Curvature.jacobian_quadratic_form(post.curvature, fm, fm.params, x_pred, delta, chunk_size=100),
        label="ours_kfac_predictive_jacobians",
    )
    rel = float((V_kron - V_jac).norm() / V_jac.norm())
    res["kfac"] = {"fit_s": t_fit, "predictive_kron_s": t_kron, "predictive_jacobians_s": t_jac, "rel_diff": rel}
    ratios["kfac_predictive_jacobians_vs_kron"] = t_jac / t_kron
    print(f"KFAC fit {t_fit:.2f}s; predictive kron {t_kron:.2f}s vs per-example Jacobians {t_jac:.2f}s "
          f"(x{t_jac / t_kron:.1f}); rel diff {rel:.1e}", flush=True)
    t_dfit, dpost = timed(lambda: laplace(fm, x, y, structure="diag", prior_precision=delta), label="ours_diag_fit")
    t_dpred, V_diag = timed(lambda: dpost.predictive_covariance(x_pred, chunk_size=250), label="ours_diag_predictive")
    res["diag"] = {"fit_s": t_dfit, "predictive_s": t_dpred}
    print(f"diag fit {t_dfit:.2f}s; predictive {t_dpred:.2f}s", flush=True)

    # 2. top-k Hessian eigenvalues, 3. trace --------------------------------------------------------
    H = build_curvature(
        fm, x, y, matrix="hessian", structure="implicit", chunk_size=len(x), reduction="mean", lanczos_tol=1e-4
    )
    t_eig, eig = timed(lambda: H.eigen(args.k, tol=1e-4), label="ours_eigen")
    ours = eig.eigenvalues.double().cpu().numpy()
    res["eigen"] = {
        "ours_s": t_eig,
        "matvecs": eig.num_matvecs,
        "converged": int(eig.converged.sum()),
        "top": ours[:5].tolist(),
    }
    print(f"top-{args.k} Hessian eigenvalues (mean loss): ours {t_eig:.2f}s, {eig.num_matvecs} matvecs, "
          f"{int(eig.converged.sum())}/{args.k} converged", flush=True)
    t_tr, tr = timed(
        lambda: hutchinson_trace(H, 100, batch_size=20, generator=torch.Generator().manual_seed(0)), label="ours_trace"
    )
    res["trace"] = {
        "ours_s": t_tr,
        "estimate": tr.estimate,
        "se": tr.standard_error,
        "probe_std": float(tr.samples.std()),
    }
    print(f"Hutchinson trace (100 probes) {t_tr:.2f}s: {tr.estimate:.3f} ± {tr.standard_error:.3f}", flush=True)
    t_pp, pp = timed(lambda: hutchpp_trace(H, 30, generator=torch.Generator().manual_seed(0)), label="ours_hutchpp")
    res["trace"].update({"hutchpp_s": t_pp, "hutchpp_estimate": pp.estimate, "hutchpp_se": pp.standard_error})
    print(f"Hutch++ trace (30 matvecs) {t_pp:.2f}s: {pp.estimate:.3f} ± {pp.standard_error:.3f}", flush=True)

    if not args.skip_peers:
        peers(
            net,
            fm,
            x,
            y,
            x_pred,
            delta,
            args.k,
            res,
            ratios,
            ours,
            V_kron,
            V_diag,
            t_fit + t_kron,
            t_dfit + t_dpred,
            t_eig,
            t_tr,
            args.skip_laplace_diag,
        )
    res["ratios"] = ratios
    res["cpu_seconds"] = CPU_SECONDS
    c = CPU_SECONDS
    cpu_ratios = {"kfac_predictive_jacobians_vs_kron": c["ours_kfac_predictive_jacobians"] / c["ours_kfac_predictive"]}
    if "curvlinops_eigen" in c:
        cpu_ratios["eigen_curvlinops_scipy"] = c["curvlinops_eigen"] / c["ours_eigen"]
    if "pyhessian_eigen" in c:
        cpu_ratios["eigen_pyhessian"] = c["pyhessian_eigen"] / c["ours_eigen"]
        cpu_ratios["trace_pyhessian_per_probe"] = (c["pyhessian_trace"] / res["trace"]["pyhessian_probes"]) / (
            c["ours_trace"] / 100
        )
        probes_needed = (res["trace"]["probe_std"] / res["trace"]["hutchpp_se"]) ** 2
        cpu_ratios["trace_pyhessian_equal_se_vs_hutchpp"] = (
            (c["pyhessian_trace"] / res["trace"]["pyhessian_probes"]) * probes_needed / c["ours_hutchpp"]
        )
    for structure, ours_keys in (
        ("kron", ("ours_kfac_fit", "ours_kfac_predictive")),
        ("diag", ("ours_diag_fit", "ours_diag_predictive")),
    ):
        if f"laplace_{structure}" in c:
            cpu_ratios[f"laplace_{structure}_fit_predictive"] = c[f"laplace_{structure}"] / sum(c[k] for k in ours_keys)
    res["cpu_ratios"] = cpu_ratios
    res["peak_rss_mb"] = peak_rss_mb()
    print(json.dumps(res))


def peers(
    net,
    fm,
    x,
    y,
    x_pred,
    delta,
    k,
    res,
    ratios,
    ours,
    V_kron,
    V_diag,
    t_kfac,
    t_diag,
    t_eig,
    t_tr,
    skip_laplace_diag=False,
) -> None:
    criterion = nn.CrossEntropyLoss()
    try:
        from curvlinops import HessianLinearOperator
        from scipy.sparse.linalg import eigsh

        def curvlinops_top():
            op = HessianLinearOperator(net, criterion, list(net.parameters()), [(x, y)]).to_scipy()
            return np.sort(eigsh(op, k=k, which="LA", return_eigenvectors=False))[::-1]

        t, ref = timed(curvlinops_top, label="curvlinops_eigen")
        err = float(np.max(np.abs(ours - ref) / np.abs(ref)))
        res["eigen"].update({"curvlinops_scipy_s": t, "max_rel_err_vs_curvlinops": err})
        ratios["eigen_curvlinops_scipy"] = t / t_eig
        print(f"  curvlinops+eigsh {t:.2f}s (x{t / t_eig:.1f}); our max rel. deviation {err:.1e}", flush=True)
    except Exception as e:  # not installed, or a broken dependency (e.g. a CUDA-only torchvision)
        print(f"  curvlinops skipped: {e!r}")
        ref = None
    try:
        import warnings

        from pyhessian import hessian as pyhessian

        warnings.filterwarnings("ignore", message="Using backward\\(\\) with create_graph=True")

        hc = pyhessian(net, criterion, data=(x, y), cuda=DEVICE.startswith("cuda"))
        t, (vals, _) = timed(lambda: hc.eigenvalues(maxIter=100, tol=1e-3, top_n=k), label="pyhessian_eigen")
        vals = np.sort(np.array(vals))[::-1]
        res["eigen"]["pyhessian_s"] = t
        ratios["eigen_pyhessian"] = t / t_eig
        if ref is not None:
            res["eigen"]["pyhessian_max_rel_err_vs_curvlinops"] = float(np.max(np.abs(vals - ref) / np.abs(ref)))
        print(f"  PyHessian {t:.2f}s (x{t / t_eig:.1f})", flush=True)
        t, trs = timed(lambda: hc.trace(maxIter=100, tol=1e-3), label="pyhessian_trace")
        res["trace"].update({"pyhessian_s": t, "pyhessian_estimate": float(np.mean(trs)), "pyhessian_probes": len(trs)})
        ratios["trace_pyhessian_per_probe"] = (t / len(trs)) / (t_tr / 100)
        # PyHessian's time to reach our Hutch++ standard error: probes needed = (probe std / SE)²
        probes_needed = (res["trace"]["probe_std"] / res["trace"]["hutchpp_se"]) ** 2
        ratios["trace_pyhessian_equal_se_vs_hutchpp"] = (t / len(trs)) * probes_needed / res["trace"]["hutchpp_s"]
        print(f"  PyHessian trace {t:.2f}s for {len(trs)} probes: {np.mean(trs):.3f}", flush=True)
    except Exception as e:
        print(f"  PyHessian skipped: {e!r}")
    try:
        from laplace import Laplace

        loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=256)
        for structure, ours_t, V_ours in (("kron", t_kfac, V_kron), ("diag", t_diag, V_diag))[
            : 1 if skip_laplace_diag else 2
        ]:

            def run(structure=structure):
                la = Laplace(
                    net, "classification", subset_of_weights="all", hessian_structure=structure, prior_precision=delta
                )
                la.fit(loader)
                return torch.cat(
                    [la._glm_predictive_distribution(x_pred[s : s + 250])[1] for s in range(0, len(x_pred), 250)]
                )

            t, V = timed(run, label=f"laplace_{structure}")
            rel = float((V - V_ours).norm() / V.norm())
            res.setdefault("laplace_torch", {})[structure] = {"fit_plus_predictive_s": t, "rel_diff_vs_ours": rel}
            ratios[f"laplace_{structure}_fit_predictive"] = t / ours_t
            print(
                f"  laplace-torch {structure}: fit+predictive {t:.2f}s vs ours {ours_t:.2f}s (x{t / ours_t:.1f}); rel "
                f"diff {rel:.1e}",
                flush=True,
            )
    except Exception as e:
        print(f"  laplace-torch skipped: {e!r}")


if __name__ == "__main__":
    main()
