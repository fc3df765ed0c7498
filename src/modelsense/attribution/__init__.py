"""Influence estimation behind one interface (`Attributor`): fit on a trained model and its
training data, then `scores(x_test, y_test)` (N, M) and `self_scores()` (N,).

Sign and scale (one convention for every method, see `base`): score(i, j) estimates the change of
test example j's loss when training example i is removed (positive = i helps j), with the
curvature of the *summed* training loss.

    >>> from modelsense.attribution import make_attributor
    >>> att = make_attributor("if-ekfac", damping=0.01).fit(model, x_train, y_train)
    >>> S = att.scores(x_test, y_test)          # (N, M)
    >>> si = att.self_scores()                  # (N,)
    >>> parts = att.scores(x_test, y_test, by_module=True)   # {module: (N, M)}, summing to S exactly
    >>> att.save("state/")                      # factors, settings, model and data fingerprints
    >>> att = load_attributor("state/", model, x_train, y_train)   # another process: no refit

Methods by name: grad-dot, grad-cos, randproj, tracin, tracin-rp (gradient); if-explicit, if-cg,
if-lissa, if-kfac, if-ekfac (influence functions); arnoldi; gex, la-kfac (ensemble covariance),
tracinrp-fge (TracIn-RP over gex's members); trak; loss, el2n, fscore, cl, knn, random
(self-influence baselines of the GEX paper); mpe (memory-perturbation sensitivity, self only).
`by_module=True` (scores and self-scores split over modules) where the split is exact:
`by_module_names()` = grad-dot, grad-cos, tracin, if-kfac, if-ekfac; the others refuse it.
"""

from modelsense.attribution.base import (
    COMPUTE_OPTIONS,
    NEEDS,
    Attributor,
    ComputeOptions,
    FeatureAttributor,
    as_functional,
    by_module_names,
    make_attributor,
    method_class,
    method_names,
    method_settings,
    parse_methods,
    register,
)

# importing a module registers its methods: this order is the order of `method_names()`
# isort: off
from modelsense.attribution.gradient import (  # noqa: F401  (registers the methods)
    GaussianProjector,
    GradientCosine,
    GradientDot,
    RandomProjection,
    TracIn,
    TracInRandomProjection,
    checkpoints_from_fit,
    tracin_checkpoint_epochs,
)
from modelsense.attribution.influence_functions import (  # noqa: F401
    ConjugateGradientInfluence,
    EkfacInfluence,
    ExplicitInfluence,
    InfluenceFunction,
    KfacInfluence,
    LissaInfluence,
)
from modelsense.attribution.arnoldi import ArnoldiInfluence  # noqa: F401
from modelsense.attribution.gex import (  # noqa: F401
    EnsembleCovariance,
    GeometricEnsemble,
    TracInRandomProjectionFge,
    fine_tune_chain,
)
from modelsense.attribution.laplace import LaplaceKfac  # noqa: F401
from modelsense.attribution.trak import Trak, margin_grads, reinitialised_copy  # noqa: F401
from modelsense.attribution.baselines import (  # noqa: F401
    ConfidentLearning,
    El2n,
    ForgettingScore,
    NearestNeighbourDisagreement,
    RandomScores,
    TrainingLoss,
)
from modelsense.attribution.mpe import MemoryPerturbation  # noqa: F401
# isort: on
from modelsense.attribution.state import load_attributor

__all__ = [
    "COMPUTE_OPTIONS", "NEEDS", "Attributor", "ComputeOptions", "FeatureAttributor", "load_attributor", "as_functional",
    "by_module_names", "make_attributor", "method_class", "method_names",
    "method_settings", "parse_methods", "register", "GaussianProjector", "GradientCosine", "GradientDot",
    "RandomProjection", "TracIn", "TracInRandomProjection", "checkpoints_from_fit", "tracin_checkpoint_epochs",
    "ConjugateGradientInfluence", "EkfacInfluence", "ExplicitInfluence", "InfluenceFunction", "KfacInfluence",
    "LissaInfluence", "ArnoldiInfluence", "EnsembleCovariance", "GeometricEnsemble", "fine_tune_chain",
    "LaplaceKfac", "Trak", "margin_grads", "reinitialised_copy", "El2n", "TrainingLoss", "MemoryPerturbation",
    "TracInRandomProjectionFge", "ConfidentLearning", "ForgettingScore", "NearestNeighbourDisagreement", "RandomScores",
]
