"""Eigenvectors kept for later: the file `modelsense spectrum --save-vectors` writes and `modelsense
perturb --vectors` reads, and the key that ties them to one model and one matrix.

    eigenvectors.npz: eigenvectors (P, k) float32, eigenvalues (k,), converged (k,), key (the JSON of
                      `vectors_key`: the sha256 of the parameters, n_params, matrix, reduction,
                      weights_only, use_test, n_examples)

`check_vectors` refuses vectors computed at another model (the parameters' sha256 differs) or with
another matrix, reduction, weights_only or use_test than the run that reads them.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from modelsense.core.functional import FunctionalModel
from modelsense.curvature.spectrum import Spectrum
from modelsense.errors import ConfigError
from modelsense.runs import require_finished

#: the file's name in a run directory (without .npz)
VECTORS_FILE = "eigenvectors"


def parameters_fingerprint(model: FunctionalModel) -> str:
    """sha256 of the parameter names and values (float32 bytes) the matrix acts on: which model a set
    of eigenvectors belongs to."""
    h = hashlib.sha256()
    for name, p in model.params.items():
        h.update(name.encode())
        h.update(p.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()


def vectors_key(model: FunctionalModel, spectrum: Spectrum, weights_only: bool, use_test: bool,
                n_examples: int) -> dict[str, Any]:
    """What the eigenvectors of `spectrum` (computed at `model`) were computed with."""
    return {"parameters_sha256": parameters_fingerprint(model), "n_params": model.n_params,
            "matrix": spectrum.config.matrix, "reduction": spectrum.config.reduction, "weights_only": weights_only,
            "use_test": use_test, "n_examples": n_examples}


def vector_arrays(spectrum: Spectrum, key: dict[str, Any]) -> dict[str, Any]:
    """The arrays of eigenvectors.npz for `spectrum` (computed with `key`)."""
    return {"eigenvectors": spectrum.eigenvectors.to(torch.float32), "eigenvalues": spectrum.eigenvalues,
            "converged": spectrum.converged, "key": np.array(json.dumps(key))}


def read_vectors(path: str | Path) -> tuple[Path, dict[str, Any], dict[str, np.ndarray]]:
    """(file, key, arrays) of a finished `spectrum --save-vectors` run (its folder or its eigenvectors.npz)."""
    path = Path(path)
    file = path / f"{VECTORS_FILE}.npz" if path.is_dir() else path
    if not file.is_file():
        raise ConfigError(f"--vectors {path}: no {VECTORS_FILE}.npz there; run `modelsense spectrum --save-vectors` "
                          "(at the model's --checkpoint) first")
    require_finished(file.parent, f"--vectors {file}")
    try:
        with np.load(file) as f:
            arrays = {k: f[k] for k in f.files}
        key = json.loads(str(arrays.pop("key")))
    except Exception as exc:  # noqa: BLE001 - any unreadable file is one message
        raise ConfigError(f"--vectors {file} is not a readable eigenvectors.npz of `modelsense spectrum` "
                          f"({exc})") from None
    return file, key, arrays


def check_vectors(file: Path, key: dict[str, Any], model: FunctionalModel, checkpoint: str,
                  **settings: Any) -> None:
    """ConfigError when the vectors of `file` (with `key`) were computed with other `settings` (weights_only,
    use_test, matrix, reduction: the reader's) or at another model than `model` (loaded from `checkpoint`)."""
    differ = [f"--{k.replace('_', '-')} {v!r} (the vectors': {key.get(k)!r})" for k, v in settings.items()
              if key.get(k) != v]
    if differ:
        raise ConfigError(f"--vectors {file} were computed with other settings: {'; '.join(differ)}; pass theirs")
    if key.get("parameters_sha256") != parameters_fingerprint(model):
        raise ConfigError(f"--vectors {file} were computed at another model than --checkpoint {checkpoint} "
                          "(the parameters differ); pass the checkpoint the spectrum run used")


__all__ = ["VECTORS_FILE", "check_vectors", "parameters_fingerprint", "read_vectors", "vector_arrays",
           "vectors_key"]
