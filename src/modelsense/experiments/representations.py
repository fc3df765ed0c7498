"""`modelsense zoo`, `compare`, `stitch`, `probe`: model zoos, layer x layer similarity, stitching, invariance probes
(Godfrey, Brown, Emerson and Kvinge 2022), run from `modelsense.retraining.zoo` (the zoo, on the ground-truth
store), `modelsense.representations.compare`, `.stitch_sweep`, `.probes` and `.plots`. Models A and B
(`ModelPair`) are each a checkpoint or a zoo member by seed, trained into the zoo (default: the run's folder)
when missing.

Run directories (besides config.json, metrics.json):
    zoo:     zoo/ (checkpoints model_<seed>.pt, zoo.json) and store/ (unless --store): the resumable state
    compare: similarity.npy, figures/similarity_<metric>.png, zoo/ and store/ (the members trained for --seed-a /
             --seed-b, unless --zoo: the resumable state, as of zoo and stitch; --backend ray trains them on Ray)
    stitch:  stitching.npz (clean_accuracy (R, 2), stitched_accuracy and penalty (R, kinds, layers), pairs
             (R, 2) seeds, -1 for a checkpoint), stitching_layers.pt (keyed <kind>/<layer>, pair<r>/<kind>/<layer>
             for R > 1), figures/stitching_penalty.png, zoo/ and store/; metrics: `stitch_sweep.combine_sweeps`.
             --repeats R > 1 stitches R random pairs of the zoo seeds --seed ... --seed + --zoo-size - 1 (the
             --retrain_repeats of Godfrey et al. 2022).
    probe:   probe.npz, figures/probe_table.png, model.pt (when trained here); metrics: `probes.probe_table`
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from modelsense.data import DataConfig, Dataset, load_dataset_from_config
from modelsense.errors import ConfigError
from modelsense.experiments.command import Command, Prepared, execute_or_reuse
from modelsense.experiments.source import TrainedRun, check_model, load_trained_run
from modelsense.models import ModelConfig
from modelsense.options import check_fields, ints, joined, names, option
from modelsense.representations.compare import METRIC_NOTES, check_metric, choose_layers, layer_list, subsample_indices
from modelsense.representations.metrics import SIMILARITIES
from modelsense.representations.probes import TRANSFORMS, probe_table_text
from modelsense.representations.stitch_sweep import stitch_kinds, stitching_text
from modelsense.representations.stitching import STITCH_KINDS, StitchConfig, evaluate_accuracy
from modelsense.retraining import zoo as model_zoo
from modelsense.retraining.store import STORE_DIR, RetrainOptions
from modelsense.runs import RunDir, locked
from modelsense.training.config import TrainConfig


# -- modelsense zoo ------------------------------------------------------------------------------
@dataclass(frozen=True)
class ZooSpec:
    """`modelsense zoo`: models of one recipe that differ only in their seed (`modelsense.retraining.zoo`)."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    n_models: int = option(8, "number of models (seeds --seed, --seed + 1, ...)", low=1)
    seeds: tuple[int, ...] = option(
        (), "explicit comma-separated seeds (overrides --n-models)", parse=ints, show=joined
    )
    method: str = option("auto", "auto (vmapped engine unless batch norm / ivon), ensemble or fit",
                         choices=model_zoo.ZOO_METHODS)
    retrain: RetrainOptions = field(default_factory=RetrainOptions)

    def __post_init__(self) -> None:
        check_fields(self)
        if self.seeds:
            model_zoo.check_seeds(self.seeds)


def check_zoo(spec: ZooSpec) -> Prepared:
    data = load_dataset_from_config(spec.data)
    model_zoo.zoo_method(spec.method, check_model(data, spec.model), spec.train, spec.retrain.backend)
    # the settings that define the members (not the seed or the device), which a resumed zoo must keep
    return Prepared(data, {"dataset": data.summary(), "zoo": model_zoo.zoo_settings(spec.data, spec.model, spec.train)})


def run_zoo(spec: ZooSpec, prepared: Prepared, run: RunDir, progress: bool = True) -> dict[str, Any]:
    """Train the zoo members the run's zoo/ does not hold yet (the engine's are jobs of the ground-truth store,
    which may hold them already: `modelsense.retraining.zoo`)."""
    zoo = model_zoo.train_zoo(spec.data, spec.model, spec.train, None if spec.seeds else spec.n_models, run.path,
                    spec.seeds or None, progress, data=prepared.data, method=spec.method, retrain=spec.retrain,
                    log=run.log)
    run.log(f"zoo of {len(zoo.seeds)} ({len(zoo.trained)} trained by {zoo.method}) in {zoo.seconds:.1f}s")
    return zoo.metrics()


ZOO = Command("zoo", ZooSpec, check_zoo, run_zoo, keep=(model_zoo.ZOO_SUBDIR, STORE_DIR), resume_keys=("zoo",),
              summary=lambda m: (f"{len(m['seeds'])} models ({m['n_trained']} trained, {m['method']}): test accuracy "
                                 f"{m['mean_test_accuracy']:.4f} ± {m['std_test_accuracy']:.4f}"),
              help="Train N models of one architecture from different seeds (a model zoo), reused by compare and "
                   "stitch.")


# -- the two models of compare and stitch --------------------------------------------------------
#: the resumable state of compare and stitch: the zoo members they trained into the run, and its store
PAIR_STATE = (model_zoo.ZOO_SUBDIR, STORE_DIR)


@dataclass(frozen=True)
class ModelPair:
    """Models A and B: each a checkpoint (`model_a`) or the zoo member of a seed (`seed_a`, trained into
    `zoo` with the spec's data, model and training settings if missing); neither given: seeds --seed
    and --seed + 1. `layers`: the layers compared or stitched."""

    model_a: str | None = option(None, "checkpoint of model A (model.pt of `modelsense train`, or zoo/model_<seed>.pt)")
    model_b: str | None = option(None, "checkpoint of model B")
    seed_a: int | None = option(None, "model A = the zoo member with this seed (trained into --zoo if missing); "
                                      "default --seed")
    seed_b: int | None = option(None, "model B = the zoo member with this seed; default --seed + 1")
    zoo: str | None = option(None, "zoo run directory holding zoo/model_<seed>.pt (default: --out)")
    layers: str = option("all", "'all' (every nn.ReLU module) or comma-separated module names, e.g. act1,act2")

    def __post_init__(self) -> None:
        for which, path, seed in (("a", self.model_a, self.seed_a), ("b", self.model_b, self.seed_b)):
            if path is not None and seed is not None:
                raise ConfigError(f"give either --model-{which} PATH or --seed-{which} N, not both")


def load_member(which: str, path: str | Path, data: Dataset) -> TrainedRun:
    """The checkpoint of model A or B (`which`: "model-a" / "model-b"), checked against `data`, in eval mode."""
    if not Path(path).is_file():
        raise ConfigError(f"--{which} {path}: no such checkpoint (a model.pt of `modelsense train` or "
                          "zoo/model_<seed>.pt of `modelsense zoo`)")
    member = load_trained_run(path, data, f"{which} ({path})",
                              fix="compare and stitch models trained on the same dataset, and pass that dataset")
    member.module.eval()
    return member


def check_channel_axes(module, layers: list[str], data: Dataset, what: str, once: bool = False) -> None:
    """A ConfigError (before anything is written) where the channel axis of a layer's features cannot be
    decided (`modelsense.representations.features.channel_axes`: one forward pass on two test examples);
    `once`: also where a layer is called more than once per forward pass (stitching and probing replace
    the one output of a layer)."""
    from modelsense.representations.features import channel_axes

    axes = channel_axes(module, data.x_test, layers)
    reused = [layer for layer in layers if layer not in axes] if once else []
    if reused:
        raise ConfigError(f"module {reused[0]!r} of {what} is called more than once per forward pass; "
                          "choose a module that is used once (give reused activations their own module)")


def check_pair(spec: CompareSpec | StitchSpec) -> Prepared:
    """The dataset, and the checkpoints of the pair, checked with what can be checked before anything is
    written or trained: each checkpoint against the data, the architecture of the zoo members and the
    layer names on it, a --zoo trained with other settings."""
    data, p = load_dataset_from_config(spec.data), spec.pair
    loaded = {which: load_member(which, path, data)
              for which, path in (("model-a", p.model_a), ("model-b", p.model_b)) if path is not None}
    probe = None
    if len(loaded) < 2:
        probe = check_model(data, spec.model)
        model_zoo.zoo_method("auto", probe, spec.train, spec.retrain.backend)
        if p.zoo is not None:
            settings = model_zoo.zoo_settings(spec.data, spec.model, spec.train)
            model_zoo.check_zoo_index(p.zoo, model_zoo.read_zoo_index(p.zoo), settings)
    for which in ("model-a", "model-b"):  # the layers (named, or every ReLU: a model may have none) on each model
        module, what = (loaded[which].module, which) if which in loaded else (probe, f"model {spec.model.name}")
        check_channel_axes(module, choose_layers(module, p.layers, what), data, what, once=isinstance(spec, StitchSpec))
    return Prepared(data, {"dataset": data.summary()}, {"loaded": loaded})


def zoo_members(spec: CompareSpec | StitchSpec, prepared: Prepared, run: RunDir, progress: bool,
                seeds: list[int]) -> dict[int, TrainedRun]:
    """The zoo members `seeds`, trained into `pair.zoo` (default the run; a zoo elsewhere is locked while
    they train) where missing, as jobs of its ground-truth store (`spec.retrain`)."""
    zoo = run.path if spec.pair.zoo is None else Path(spec.pair.zoo)
    with contextlib.nullcontext() if zoo.resolve() == run.path.resolve() else locked(zoo, "zoo"):
        res = model_zoo.train_zoo(spec.data, spec.model, spec.train, None, zoo, sorted(set(seeds)), progress,
                                  data=prepared.data, retrain=spec.retrain, log=run.log)
    return {s: load_member("model", res.paths[res.seeds.index(s)], prepared.data) for s in set(seeds)}


def pair_models(spec: CompareSpec | StitchSpec, prepared: Prepared, run: RunDir,
                progress: bool) -> tuple[TrainedRun, TrainedRun]:
    """Models A and B: the checkpoints, else the zoo members of --seed-a / --seed-b (default --seed, --seed + 1)."""
    p, seed, loaded = spec.pair, spec.train.seed, prepared.extra["loaded"]
    seed_a = seed if p.model_a is None and p.seed_a is None else p.seed_a
    seed_b = (seed + 1 if seed_a == seed else seed) if p.model_b is None and p.seed_b is None else p.seed_b
    seeds = {which: s for which, s in (("model-a", seed_a), ("model-b", seed_b)) if which not in loaded}
    members = zoo_members(spec, prepared, run, progress, list(seeds.values())) if seeds else {}
    return tuple(loaded[which] if which in loaded else members[seeds[which]] for which in ("model-a", "model-b"))


# -- modelsense compare --------------------------------------------------------------------------
@dataclass(frozen=True)
class CompareSpec:
    """`modelsense compare`: layer x layer similarity of two models on the test set."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    pair: ModelPair = field(default_factory=ModelPair)
    retrain: RetrainOptions = field(default_factory=RetrainOptions)
    metric: str = option("cka", f"{', '.join(SIMILARITIES[:-1])} or {SIMILARITIES[-1]} (all reported as similarities)")
    n_examples: int | None = option(None, "use a seeded random subset of this many test examples (n x n kernels)")


def check_compare(spec: CompareSpec) -> Prepared:
    metric = check_metric(spec.metric)
    min_n = 4 if metric in ("unbiased-cka", "relu-cka") else 2
    if spec.n_examples is not None and spec.n_examples < min_n:
        raise ConfigError(f"--n-examples must be >= {min_n} for metric {metric}, got {spec.n_examples}")
    return check_pair(spec)


def run_compare(spec: CompareSpec, prepared: Prepared, run: RunDir, progress: bool = True) -> dict[str, Any]:
    """The similarity matrix of A and B on the test set (a seeded subset of `n_examples`), its heatmap."""
    from modelsense.representations import plots
    from modelsense.representations.compare import compare_representations, comparison_metrics

    data, metric = prepared.data, check_metric(spec.metric)
    a, b = pair_models(spec, prepared, run, progress)
    idx = subsample_indices(data.n_test, spec.n_examples, spec.data.seed)
    start = time.perf_counter()
    res = compare_representations(a.module, b.module, data.x_test[idx], metric, layer_list(spec.pair.layers),
                                  device=spec.train.device)
    seconds, matrix = time.perf_counter() - start, res["matrix"]
    run.save_array("similarity", matrix)
    labels = [name if m.info.get("seed") is None else f"{name} (seed {m.info['seed']})"
              for name, m in (("A", a), ("B", b))]
    run.save_figure(plots.similarity_heatmap(matrix, res["layers"], res["layers_b"], f"{metric} on {data.name}",
                                             *labels), f"similarity_{metric}")
    metrics = {**comparison_metrics(res, metric), "n_examples": len(idx), "model_a": str(a.path),
               "model_b": str(b.path), "seconds": seconds,
               "clean_accuracy": [evaluate_accuracy(m.module, data.x_test, data.y_test) for m in (a, b)]}
    run.log(f"{metric} diagonal {np.round(metrics['diagonal'], 4).tolist()} in {seconds:.1f}s")
    return metrics


def compare_summary(m: dict[str, Any]) -> str:
    diag = " ".join(f"{layer}={v:.4f}" for layer, v in zip(m["layers"], m["diagonal"]))
    return f"{m['metric']} (similarity) diagonal: {diag}" + (f"\n{METRIC_NOTES[m['metric']]}" if m["metric"] in
                                                              METRIC_NOTES else "")


COMPARE = Command("compare", CompareSpec, check_compare, run_compare, summary=compare_summary, keep=PAIR_STATE,
                  help="Layer x layer similarity of two models' representations on the test set, with a heatmap.")


# -- modelsense stitch ---------------------------------------------------------------------------
@dataclass(frozen=True)
class StitchSpec:
    """`modelsense stitch`: stitch A into B after each chosen layer, with each stitching kind
    (`stitch` holds the settings the kinds share; its seed and device are the training's)."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    pair: ModelPair = field(default_factory=ModelPair)
    retrain: RetrainOptions = field(default_factory=RetrainOptions)
    kinds: tuple[str, ...] = option(("linear",), f"{', '.join(STITCH_KINDS)}, or a comma list of them", flag="--kind",
                                    parse=stitch_kinds, show=joined)
    stitch: StitchConfig = field(default_factory=StitchConfig)
    repeats: int = option(1, "random pairs of zoo models (--retrain_repeats of Godfrey et al. 2022); more than one: "
                             "the mean and standard deviation over the pairs", low=1)
    zoo_size: int | None = option(None, "draw the pairs from the zoo seeds --seed ... --seed + zoo_size - 1 (trained "
                                        "where missing; default --repeats + 1)", low=2)

    def __post_init__(self) -> None:
        check_fields(self)
        p = self.pair
        named = [f for f, v in (("--model-a", p.model_a), ("--model-b", p.model_b), ("--seed-a", p.seed_a),
                                ("--seed-b", p.seed_b)) if v is not None]
        if named and (self.repeats > 1 or self.zoo_size is not None):
            raise ConfigError(f"--repeats / --zoo-size draw random pairs of zoo models; they cannot be combined with "
                              f"{', '.join(named)}")


def check_stitch(spec: StitchSpec) -> Prepared:
    base = replace(spec.stitch, seed=spec.train.seed, device=spec.train.device)
    pairs = None
    if spec.repeats > 1 or spec.zoo_size is not None:
        size = spec.repeats + 1 if spec.zoo_size is None else spec.zoo_size
        seed = spec.train.seed
        pairs = model_zoo.draw_pairs(range(seed, seed + size), spec.repeats, seed=seed)
    prepared = check_pair(spec)
    prepared.config["stitch"] = asdict(base)  # the settings used
    if pairs is not None:
        prepared.config["pairs"] = [list(pair) for pair in pairs]
    prepared.extra.update(configs=[replace(base, kind=k) for k in stitch_kinds(spec.kinds)], pairs=pairs)
    return prepared


def run_stitch(spec: StitchSpec, prepared: Prepared, run: RunDir, progress: bool = True) -> dict[str, Any]:
    """The stitching sweep over the layers and kinds, for one pair (A, B) or `repeats` random zoo pairs;
    metrics per kind, a list over the layers (the mean over the pairs, and their standard deviation)."""
    from modelsense.representations import plots
    from modelsense.representations.stitch_sweep import combine_sweeps, stitching_states, stitching_sweeps

    data, pairs = prepared.data, prepared.extra["pairs"]
    if pairs is None:
        members = [pair_models(spec, prepared, run, progress)]
    else:
        zoo = zoo_members(spec, prepared, run, progress, [s for pair in pairs for s in pair])
        members = [(zoo[sa], zoo[sb]) for sa, sb in pairs]

    def log_pair(r: int, sweep: Any) -> None:
        if pairs is not None:
            run.log(f"pair {r + 1}/{len(pairs)} (seeds {pairs[r][0]}, {pairs[r][1]}): penalties "
                    f"{ {k: np.round(v, 4).tolist() for k, v in sweep.penalty.items()} }")

    layers = choose_layers(members[0][0].module, spec.pair.layers, "model-a")
    start = time.perf_counter()
    sweeps = stitching_sweeps([(a.module, b.module) for a, b in members], layers, prepared.extra["configs"],
                              data.x_train, data.y_train, data.x_test, data.y_test, progress, log_pair)
    seconds = time.perf_counter() - start
    arrays, metrics = combine_sweeps(sweeps)
    seeds = [[-1 if m.info.get("seed") is None else m.info["seed"] for m in pair] for pair in members]
    run.save_arrays("stitching", layers=np.asarray(layers), kinds=np.asarray(metrics["kinds"]), **arrays,
                    pairs=np.asarray(seeds))
    run.save_torch("stitching_layers", stitching_states(sweeps))
    several = len(sweeps) > 1
    run.save_figure(plots.stitching_penalty_figure(
        layers, metrics["penalty"], metrics["stitched_accuracy"], metrics["clean_accuracy"],
        f"stitching A -> B on {data.name}" + (f", mean ± sd over {len(sweeps)} random pairs" if several else ""),
        penalty_std=metrics.get("penalty_std"), accuracy_std=metrics.get("stitched_accuracy_std")), "stitching_penalty")
    sources = [[str(m.path) for m in pair] for pair in zip(*members)]  # [[A of each pair], [B of each pair]]
    metrics.update(seconds=seconds, model_a=sources[0] if several else sources[0][0],
                   model_b=sources[1] if several else sources[1][0], **({"pairs": seeds} if several else {}))
    run.log(f"stitching penalties {metrics['mean_penalty']} in {seconds:.1f}s")
    return metrics


STITCH = Command("stitch", StitchSpec, check_stitch, run_stitch, summary=stitching_text, keep=PAIR_STATE,
                 hide=frozenset({"stitch.kind"}),
                 help="Stitch model A into model B after each chosen ReLU layer; stitched accuracy and penalty per "
                      "layer.")


# -- modelsense probe ----------------------------------------------------------------------------
@dataclass(frozen=True)
class ProbeSpec:
    """`modelsense probe`: transform layers of one trained network by random orthogonal, G_ReLU and invertible
    maps (`modelsense.representations.probes`) and measure every similarity metric between the original's and
    the transformed network's features, with the change of the network's outputs."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: str | None = option(None, "model.pt of `modelsense train` / `zoo` to probe instead of training one "
                                          "(its data and model recipe are used)")
    weights: str | None = option(None, "a state_dict of --model trained elsewhere (torch.save(model.state_dict(), "
                                       "path)) to probe instead of training one")
    layers: str = option("all", "'all' (every nn.ReLU module) or comma-separated activation module names, e.g. act1")
    transforms: tuple[str, ...] = option(TRANSFORMS, "comma-separated transforms: " + ", ".join(TRANSFORMS),
                                         parse=names, show=joined, choices=TRANSFORMS)
    repeats: int = option(3, "random transforms per layer and kind (--repeats of Godfrey et al. 2022)", low=1)
    sigma: float = option(1.0, "sigma of the G_ReLU scales exp(sigma g) / exp(sigma^2 / 2) (Godfrey et al. 2022: 1)",
                          low=0.0)
    n_examples: int | None = option(500, "a seeded random subset of this many test examples (n x n kernels); "
                                         "none: all", low=4)

    def __post_init__(self) -> None:
        check_fields(self)
        if not self.transforms:
            raise ConfigError(f"--transforms needs at least one of {', '.join(TRANSFORMS)}")


def check_probe(spec: ProbeSpec) -> Prepared:
    from modelsense.experiments.source import model_source

    data = load_dataset_from_config(spec.data)
    trained = model_source(spec.checkpoint, spec.weights, spec.data, spec.model, data)
    module = check_model(data, spec.model) if trained is None else trained.module
    layers = choose_layers(module, spec.layers, "the model")
    check_channel_axes(module, layers, data, "the model", once=True)
    config = {"dataset": data.summary(), "layers_used": layers,
              **({} if trained is None else {"source": trained.summary()})}
    return Prepared(data, config, {"trained": trained, "layers": layers})


def run_probe(spec: ProbeSpec, prepared: Prepared, run: RunDir, progress: bool = True) -> dict[str, Any]:
    """The network (trained here, or the checkpoint), the probe on a seeded subset of the test set, the table."""
    from modelsense.experiments.source import obtain_model
    from modelsense.representations import plots
    from modelsense.representations.probes import invariance_probe, probe_table

    data = prepared.data
    got = obtain_model(data, spec.model, spec.train, trained=prepared.extra["trained"], run=run, progress=progress)
    idx = subsample_indices(data.n_test, spec.n_examples, spec.data.seed)
    start = time.perf_counter()
    res = invariance_probe(got.module.eval(), prepared.extra["layers"], data.x_test[idx], data.y_test[idx],
                           transforms=spec.transforms, repeats=spec.repeats, seed=spec.train.seed, sigma=spec.sigma,
                           device=spec.train.device)
    seconds, table = time.perf_counter() - start, probe_table(res)
    run.save_arrays("probe", **table.arrays)
    run.save_figure(plots.probe_table_figure(table.mean, table.rows, res.metrics, table.invariant,
                                             f"invariance probe: {got.model.name} on {data.name}, mean of "
                                             f"{spec.repeats} transform(s) (framed: must give 1)"), "probe_table")
    metrics = {**table.metrics, "n_examples": len(idx), "seconds": seconds}
    run.log(f"probe: max |1 - s| over the invariant cells {metrics['max_deviation_invariant']}, in {seconds:.1f}s")
    return metrics


PROBE = Command("probe", ProbeSpec, check_probe, run_probe, summary=probe_table_text,
                help="Invariance probes: transform a layer of a trained network by random orthogonal, G_ReLU "
                     "(compensated in the next layer: the function is unchanged) and invertible maps and report every "
                     "similarity metric between the features before and after (Godfrey et al. 2022).")


# -- demo ----------------------------------------------------------------------------------------
def representations_section(out: Path, progress: bool, resume: bool = False) -> Section:  # noqa: F821
    """Demo: CKA of two digits MLPs (seeds 0, 1), stitching penalties at both hidden layers, the invariance probe."""
    from modelsense.report import Section

    root = Path(out) / "representations"
    pair = ModelPair(seed_a=0, seed_b=1, zoo=str(root))
    runs = {"compare": (COMPARE, CompareSpec(pair=pair, metric="cka")),
            "compare_relu_cka": (COMPARE, CompareSpec(pair=pair, metric="relu-cka")),
            "stitch": (STITCH, StitchSpec(pair=pair, kinds=("linear", "permutation"), stitch=StitchConfig(lr=1e-2))),
            "probe": (PROBE, ProbeSpec(checkpoint=str(model_zoo.zoo_member_path(root, 0)), repeats=1,
                                       n_examples=200))}
    cmp, relu, st, probe = (execute_or_reuse(command, spec, root / name, resume=resume, progress=progress)
                            for name, (command, spec) in runs.items())
    table = probe["table"]["act1"]
    metrics: dict[str, Any] = {
        "clean_accuracy": [round(v, 4) for v in st["clean_accuracy"]],
        **{f"cka {layer}": v for layer, v in zip(cmp["layers"], cmp["diagonal"])},
        **{f"relu-cka {layer}": v for layer, v in zip(relu["layers"], relu["diagonal"])},
        **{f"penalty {k} {layer}": p for k in st["kinds"] for layer, p in zip(st["layers"], st["penalty"][k])},
        **{f"probe act1 {t} {site}: {m}": table[t][site][m] for t, site, m in (
            ("orthogonal", "pre", "cka"), ("orthogonal", "pre", "relu-cka"), ("grelu", "post", "cka"),
            ("grelu", "post", "relu-procrustes"), ("invertible", "pre", "procrustes"))},
        "probe: largest |1 - s| of the invariant metrics": probe["max_deviation_invariant"],
        "probe act1: output change under G_ReLU / orthogonal": [probe["output_change"]["act1"][t]
                                                                for t in ("grelu", "orthogonal")],
    }
    return Section(
        "Representations: CKA and stitching of two MLPs trained from different seeds",
        "Linear CKA between every pair of ReLU layers of two digits MLPs (64-128-128-10) that differ only in "
        "their seed, on the test set (1 = identical up to rotation and scale). " + METRIC_NOTES["relu-cka"] + " "
        "Stitching: model A up to a ReLU, "
        "a trained 128x128 layer, then model B; penalty = mean clean accuracy - stitched accuracy. 'linear' is an "
        "unconstrained matrix, 'permutation' a permutation times a positive diagonal (the ReLU symmetry group "
        "G_ReLU, Godfrey et al. 2022), trained on the Birkhoff polytope and rounded by the Hungarian algorithm. "
        "Stitching layers train for 20 epochs with plain SGD at lr 0.01 (the default of Godfrey et al. 2022's code "
        "for G_ReLU layers). "
        "Invariance probe (model A): a random orthogonal, G_ReLU (permutation x positive scaling) or invertible M "
        "multiplies a layer's pre-activations, M^-1 is applied after its ReLU (absorbed by the next layer): G_ReLU "
        "leaves the network's outputs unchanged, the others do not; 'pre' compares the pre-activations z with M z, "
        "'post' the ReLU outputs. A metric invariant to the group gives 1 (CKA and Procrustes for orthogonal at pre; "
        "the G_ReLU metrics for G_ReLU, also at post).",
        metrics,
        [root / name / "figures" / f"{figure}.png" for name, figure in (("compare", "similarity_cka"),
                                                                         ("stitch", "stitching_penalty"),
                                                                         ("probe", "probe_table"))],
        str(root),
    )


__all__ = ["COMPARE", "PROBE", "STITCH", "ZOO", "CompareSpec", "ModelPair", "ProbeSpec", "StitchSpec", "ZooSpec",
           "representations_section"]
