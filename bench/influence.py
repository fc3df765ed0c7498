"""Benchmark of the influence estimators against kronfluence, dattri and captum, on one trained model.

Setting (defaults): digits, MLP 64-128-128-10 trained with SGD (lr 0.1, 50 epochs, 5 epoch checkpoints
in the second half for TracIn), scores of all 1297 training examples on all 500 test examples.
In the same run:
  - ours: if-ekfac, tracin (5 checkpoints, lr-weighted), arnoldi (top 20), randproj, trak, grad-dot;
  - kronfluence EK-FAC (pairwise scores), dattri EK-FAC / Arnoldi / TracIn (5 checkpoints), captum
    TracInCP (5 checkpoints) / ArnoldiInfluenceFunction — each only if it imports;
  - the floor: one vmapped per-example gradient pass over train and test plus one matrix product;
  - the LDS of every score matrix against M models trained from scratch on random α-subsets
    (retraining engine; cached in --out).
Every method's scores are oriented to the package convention (score(i, j) = rise of test loss j
when training example i is removed; the peers' documented conventions agree up to a transpose).
Times are wall-clock seconds of fit + scores (CPU seconds also recorded), medians of --repeats.
Last line: a JSON object with times, LDS, and the time ratios ours / peer and ours / floor.

Run: .venv/bin/python bench/influence.py [--threads 2] [--dataset mnist1d --widths 256,256]
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import statistics
import tempfile
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F
from _common import bench_parser, peak_rss_mb, start_bench, sync
from torch import nn

from modelsense.attribution import make_attributor
from modelsense.attribution.evaluation import lds_ground_truth, linear_datamodeling_score
from modelsense.attribution.settings import method_context
from modelsense.core.functional import FunctionalModel
from modelsense.data import DataConfig, load_dataset_from_config
from modelsense.experiments.source import obtain_model
from modelsense.models import ModelConfig
from modelsense.progress import set_quiet
from modelsense.training import TrainConfig

DEVICE = "cpu"  # set by --device
CPU: dict[str, float] = {}


RUNS: dict[str, list[float]] = {}


def timed(label: str, fn, repeats: int = 1):
    """Median wall-clock seconds of `repeats` runs of fn (all runs kept in RUNS, the median run's CPU
    seconds in CPU) and the last run's result."""
    walls, cpus, out = [], [], None
    for _ in range(repeats):
        sync(DEVICE)
        t0, c0 = time.perf_counter(), time.process_time()
        out = fn()
        sync(DEVICE)
        walls.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
    order = sorted(range(len(walls)), key=walls.__getitem__)
    mid = order[len(order) // 2]
    RUNS[label], CPU[label] = walls, cpus[mid]
    return statistics.median(walls), out


# -- ours -------------------------------------------------------------------------------------
def ours(name, module, data, result, train_cfg, model_cfg, settings, xt, yt):
    method, _, ens = name.partition("-x")  # "if-ekfac-x5": if-ekfac averaged over 5 models

    def run():
        ctx = method_context(method, result, train_cfg, model_cfg, data)
        extra = {"n_models": int(ens)} if ens else {}
        att = make_attributor(method, {**settings.get(method, {}), **ctx, **extra, "progress": False}, strict=False)
        return att.fit(module, data.x_train, data.y_train).scores(xt, yt).double().cpu().numpy()

    return run


def floor(module, data, xt, yt):
    """Per-example gradients of train and test (one vmapped pass each) and their product."""
    fm = FunctionalModel(module)

    def run():
        g = fm.per_example_grads(fm.params, data.x_train, data.y_train, chunk_size=2048, flat=True)
        gt = fm.per_example_grads(fm.params, xt, yt, chunk_size=2048, flat=True)
        return (g @ gt.T).double().cpu().numpy()

    return run


# -- peers ------------------------------------------------------------------------------------
def _flat_loss(model, input_shape):
    def loss_func(params, batch):
        x, y = batch
        out = torch.func.functional_call(model, params, (x.reshape(-1, *input_shape),))
        return F.cross_entropy(out, y.reshape(-1))

    return loss_func


def kronfluence_ekfac(module, data, xt, yt, strategy="ekfac"):
    try:
        from kronfluence.analyzer import Analyzer, prepare_model
        from kronfluence.arguments import FactorArguments, ScoreArguments
        from kronfluence.task import Task
    except ImportError as exc:
        error = exc

        def missing():
            raise error

        return missing

    class Classification(Task):
        def compute_train_loss(self, batch, model, sample=False):
            x, y = batch
            logits = model(x)
            if sample:
                with torch.no_grad():
                    y = torch.multinomial(torch.softmax(logits.detach(), -1), 1).flatten()
            return F.cross_entropy(logits, y, reduction="sum")

        def compute_measurement(self, batch, model):
            x, y = batch
            return F.cross_entropy(model(x), y, reduction="sum")

    train = torch.utils.data.TensorDataset(data.x_train, data.y_train)
    query = torch.utils.data.TensorDataset(xt, yt)

    def run():
        with tempfile.TemporaryDirectory() as tmp:
            task = Classification()
            model = prepare_model(copy.deepcopy(module).eval(), task)
            an = Analyzer("bench", model=model, task=task, cpu=DEVICE == "cpu", disable_tqdm=True, output_dir=tmp)
            an.fit_all_factors(
                "f",
                dataset=train,
                per_device_batch_size=len(train),
                factor_args=FactorArguments(strategy=strategy),
                overwrite_output_dir=True,
            )
            an.compute_pairwise_scores(
                "s",
                "f",
                query_dataset=query,
                train_dataset=train,
                per_device_query_batch_size=len(query),
                per_device_train_batch_size=len(train),
                score_args=ScoreArguments(),
                overwrite_output_dir=True,
            )
            return (
                an.load_pairwise_scores("s")["all_modules"].T.detach().double().cpu().numpy()
            )  # (n_query, N) -> (N, n_query)

    return run


def _loaders(data, xt, yt, bs=None):
    train = torch.utils.data.TensorDataset(data.x_train, data.y_train)
    test = torch.utils.data.TensorDataset(xt, yt)
    return (torch.utils.data.DataLoader(train, batch_size=bs or len(train), shuffle=False),
            torch.utils.data.DataLoader(test, batch_size=bs or len(test), shuffle=False))


def dattri_method(kind, module, data, xt, yt, checkpoints, lrs, rank, damping):
    model = copy.deepcopy(module).eval()
    loss = _flat_loss(model, data.input_shape)
    final = {k: v.detach().clone() for k, v in model.state_dict().items()}

    def run():
        from dattri.algorithm.influence_function import IFAttributorArnoldi, IFAttributorEKFAC
        from dattri.algorithm.tracin import TracInAttributor
        from dattri.task import AttributionTask

        train_loader, test_loader = _loaders(data, xt, yt, bs=256)
        if kind == "tracin":
            task = AttributionTask(loss_func=loss, model=model, checkpoints=[{**final, **c} for c in checkpoints])
            att = TracInAttributor(task, weight_list=torch.tensor(lrs), normalized_grad=False, device=DEVICE)
            return att.attribute(train_loader, test_loader).detach().double().cpu().numpy()
        task = AttributionTask(loss_func=loss, model=model, checkpoints=final)
        if kind == "ekfac":
            att = IFAttributorEKFAC(task, device=DEVICE, damping=damping)
        else:
            att = IFAttributorArnoldi(task, device=DEVICE, proj_dim=rank)
        att.cache(train_loader)
        return att.attribute(train_loader, test_loader).detach().double().cpu().numpy()

    return run


def captum_method(kind, module, data, xt, yt, checkpoints, lrs, rank, tmp):
    model = copy.deepcopy(module).eval()
    paths = []
    for k, (c, lr) in enumerate(zip(checkpoints, lrs)):
        p = Path(tmp) / f"captum_ckpt_{k}.pt"
        torch.save({"params": c, "lr": lr}, p)
        paths.append(str(p))
    final = Path(tmp) / "captum_final.pt"
    torch.save({"params": {k: v.detach() for k, v in model.named_parameters()}, "lr": 1.0}, final)

    def load(m, path):
        ck = torch.load(path, weights_only=False)
        m.load_state_dict({**m.state_dict(), **ck["params"]})
        return ck["lr"]

    train = torch.utils.data.TensorDataset(data.x_train, data.y_train)

    def run():
        from captum.influence import TracInCP
        from captum.influence._core.arnoldi_influence_function import ArnoldiInfluenceFunction  # not exported in 0.9

        loss_fn = nn.CrossEntropyLoss(reduction="sum")
        if kind == "tracin":
            tr = TracInCP(model, train, paths, checkpoints_load_func=load, loss_fn=loss_fn, batch_size=len(train),
                          sample_wise_grads_per_batch=True)
            return tr.influence((xt, yt)).T.detach().double().cpu().numpy()
        af = ArnoldiInfluenceFunction(model, train, str(final), checkpoints_load_func=load, loss_fn=loss_fn,
                                      batch_size=256, projection_dim=rank, sample_wise_grads_per_batch=True)
        return af.influence((xt, yt)).T.detach().double().cpu().numpy()

    return run


def main() -> None:
    global DEVICE
    ap = bench_parser(__doc__.splitlines()[0], threads=2, repeats=1)
    ap.add_argument("--dataset", default="digits")
    ap.add_argument("--widths", default="128,128")
    ap.add_argument("--epochs", type=int, default=50)
    ap.add_argument("--lr", type=float, default=0.1)
    ap.add_argument("--n-test", type=int, default=500)
    ap.add_argument("--n-models", type=int, default=100)
    ap.add_argument("--alpha", type=float, default=0.5)
    ap.add_argument("--rank", type=int, default=20, help="Arnoldi eigendirections (ours and peers)")
    ap.add_argument("--dattri-damping", type=float, default=0.1)
    ap.add_argument("--ours", default="if-ekfac,if-ekfac-x5,tracin,arnoldi,randproj,trak,grad-dot",
                    help="our methods; NAME-xM averages NAME over M independently trained models")
    ap.add_argument("--peers", default="kronfluence,dattri,captum")
    ap.add_argument("--skip", default="", help="comma-separated run names to leave out, e.g. captum-arnoldi")
    ap.add_argument("--out", default="bench_out/influence")
    args = ap.parse_args()
    DEVICE = start_bench(args)
    set_quiet(True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    data_cfg = DataConfig(args.dataset)
    model_cfg = ModelConfig("mlp", widths=tuple(int(w) for w in args.widths.split(",")))
    train_cfg = TrainConfig(lr=args.lr, epochs=args.epochs, bs=64, delta=1.0, eval_every=0, device=DEVICE)
    data = load_dataset_from_config(data_cfg)
    data = dataclasses.replace(data, **{k: getattr(data, k).to(DEVICE)
                                        for k in ("x_train", "y_train", "x_test", "y_test")})
    n_test = min(args.n_test, data.n_test)
    xt, yt = data.x_test[:n_test], data.y_test[:n_test]
    from modelsense.attribution import tracin_checkpoint_epochs

    got = obtain_model(
        data, model_cfg, train_cfg, progress=False, checkpoint_epochs=tracin_checkpoint_epochs(args.epochs)
    )
    module, result, train_cfg = got.module.eval(), got.fit, got.train
    from modelsense.attribution import checkpoints_from_fit

    ckpts, lrs = checkpoints_from_fit(result)
    n_params = sum(p.numel() for p in module.parameters())
    print(f"{args.dataset}: N={data.n_train}, n_test={n_test}, MLP widths {args.widths} (P={n_params}), "
          f"{len(ckpts)} checkpoints, {args.threads} threads")

    settings = {"arnoldi": {"rank": args.rank}}
    runs: dict[str, tuple] = {"floor": ("floor", floor(module, data, xt, yt))}
    for m in [m for m in args.ours.split(",") if m]:
        runs[m] = ("ours", ours(m, module, data, result, train_cfg, model_cfg, settings, xt, yt))
    peers = set(args.peers.split(",")) if args.peers else set()
    tmp = tempfile.mkdtemp()
    if "kronfluence" in peers:
        runs["kronfluence-ekfac"] = ("peer", kronfluence_ekfac(module, data, xt, yt))
    if "dattri" in peers:
        for kind in ("ekfac", "arnoldi", "tracin"):
            runs[f"dattri-{kind}"] = (
                "peer",
                dattri_method(kind, module, data, xt, yt, ckpts, lrs, args.rank, args.dattri_damping),
            )
    if "captum" in peers:
        for kind in ("tracin", "arnoldi"):
            runs[f"captum-{kind}"] = ("peer", captum_method(kind, module, data, xt, yt, ckpts, lrs, args.rank, tmp))

    for name in [n for n in args.skip.split(",") if n]:
        runs.pop(name, None)
    seconds, scores, errors = {}, {}, {}
    for name, (_, fn) in runs.items():
        try:
            seconds[name], s = timed(name, fn, args.repeats)
            if s.shape != (data.n_train, n_test):
                raise RuntimeError(f"scores of shape {s.shape}, expected {(data.n_train, n_test)}")
            scores[name] = s
            print(f"{name:>18s}: {seconds[name]:7.2f} s (cpu {CPU[name]:.1f} s)", flush=True)
        except Exception as exc:  # noqa: BLE001 - a failing peer is reported, not fatal
            errors[name] = f"{type(exc).__name__}: {exc}"
            print(f"{name:>18s}: FAILED {errors[name][:200]}", flush=True)
            traceback.print_exc(limit=2)

    store = out / "ground_truth_store"  # the models of the LDS, reused by later runs of this benchmark
    t0 = time.perf_counter()
    masks, losses = lds_ground_truth(data_cfg, data, model_cfg, train_cfg, n_test, n_models=args.n_models,
                                     alpha=args.alpha, root=store, progress=False)
    print(f"ground truth: {args.n_models} models in {time.perf_counter() - t0:.1f} s (stored in {store})")
    lds = {}
    for name, s in scores.items():
        lds[name], _ = linear_datamodeling_score(s, masks, losses)
    print(f"{'method':>18s}  {'seconds':>8s}  {'LDS':>7s}")
    for name in scores:
        print(f"{name:>18s}  {seconds[name]:8.2f}  {lds[name]:7.4f}")

    pairs = {
        "if-ekfac": ["kronfluence-ekfac", "dattri-ekfac"],
        "if-ekfac-x5": ["kronfluence-ekfac", "dattri-ekfac"],
        "tracin": ["dattri-tracin", "captum-tracin"],
        "arnoldi": ["dattri-arnoldi", "captum-arnoldi"],
    }
    ratios = {}
    for ours_name, peer_names in pairs.items():
        if ours_name not in seconds:
            continue
        for p in peer_names:
            if p in seconds:
                ratios[f"{ours_name}/{p}"] = seconds[ours_name] / seconds[p]
    if "trak" in seconds and "if-ekfac" in seconds:
        ratios["trak/if-ekfac"] = seconds["trak"] / seconds["if-ekfac"]
    peer_times = [seconds[n] for n, (kind, _) in runs.items() if kind == "peer" and n in seconds]
    fastest_peer = min(peer_times) if peer_times else None
    for n, (kind, _) in runs.items():
        if kind == "ours" and n in seconds:
            ratios[f"{n}/floor"] = seconds[n] / seconds["floor"] if "floor" in seconds else None
            if fastest_peer:
                ratios[f"{n}/fastest_peer"] = seconds[n] / fastest_peer
    summary = {
        "dataset": args.dataset,
        "widths": args.widths,
        "n_params": n_params,
        "n_train": data.n_train,
        "n_test": n_test,
        "threads": args.threads,
        "repeats": args.repeats,
        "load_average_1min": round(os.getloadavg()[0], 2),
        "device": DEVICE,
        "n_models_lds": args.n_models,
        "seconds": seconds,
        "runs_s": {k: [round(t, 3) for t in RUNS[k]] for k in seconds},
        "cpu_seconds": {k: CPU[k] for k in seconds},
        "lds": lds,
        "ratios": ratios,
        "errors": errors,
        "peak_rss_mb": peak_rss_mb(),
    }
    (out / f"summary_{args.dataset}_{args.widths.replace(',', '-')}.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
