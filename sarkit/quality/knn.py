"""kNN screening in the standardised feature space, and seed labels.

Seeds say what a good and a bad tile look like. Without hand labels they are bootstrapped
from the rules' clearest cases: every tile a content rule fails (flat, saturated,
structure-poor; not nodata, whose valid part may be fine) is a drop seed, every tile that
passes all rules with a margin is a keep seed; the kNN then decides the tiles close to a
threshold. With hand labels (``--seed-labels``) the labelled tiles and the content-rule
failures are the seeds and the kNN decides every other tile that passes the rules.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np

from sarkit.errors import SarkitError

#: Features the kNN compares, each with the transform that makes its scale roughly even.
#: Content only: how much of a tile is nodata is the nodata rule's business.
KNN_FEATURES: tuple[tuple[str, str], ...] = (
    ("std", "log1p"),
    ("cv", "id"),
    ("enl", "log1p"),
    ("entropy", "id"),
    ("dynamic_range", "log1p"),
    ("saturated_frac", "id"),
    ("bright_frac", "sqrt"),
    ("bright_cells", "log1p"),
    ("edge_density", "sqrt"),
    ("structure", "log1p"),
    *(
        (f"glcm_{prop}_d{d}", "log1p" if prop in ("contrast", "dissimilarity") else "id")
        for prop in ("contrast", "dissimilarity", "homogeneity", "energy", "correlation", "asm")
        for d in (1, 2, 4)
    ),
)

LABEL_WORDS = {
    "keep": True,
    "1": True,
    "true": True,
    "yes": True,
    "good": True,
    "drop": False,
    "0": False,
    "false": False,
    "no": False,
    "bad": False,
}


def feature_vector(quality: dict, extra: tuple[str, ...] = ()) -> list[float]:
    """The kNN's view of one tile (missing or non-numeric features count as 0)."""
    out = []
    for name, how in (*KNN_FEATURES, *((e, "id") for e in extra)):
        value = quality.get(name, 0.0)
        x = float(value) if isinstance(value, (int, float)) and math.isfinite(value) else 0.0
        if how == "log1p":
            x = math.copysign(math.log1p(abs(x)), x)
        elif how == "sqrt":
            x = math.copysign(math.sqrt(abs(x)), x)
        out.append(x)
    return out


def read_seed_labels(path: Path) -> dict[str, bool]:
    """``id,label`` rows (a header line is allowed); label keep/drop, 1/0, true/false, ..."""
    labels: dict[str, bool] = {}
    try:
        fh = open(path, newline="", encoding="utf-8")
    except OSError as exc:
        raise SarkitError(f"{path}: cannot read seed labels ({exc.strerror})") from exc
    with fh:
        for line_no, row in enumerate(csv.reader(fh), start=1):
            cells = [c.strip() for c in row]
            if not cells or not any(cells) or cells[0].startswith("#"):
                continue
            if len(cells) < 2:
                raise SarkitError(f"{path}:{line_no}: expected 'id,label', got {row!r}")
            word = cells[1].lower()
            if word not in LABEL_WORDS:
                if line_no == 1 and word in ("label", "keep?", "quality", "class"):
                    continue  # header
                known = ", ".join(sorted(LABEL_WORDS))
                raise SarkitError(f"{path}:{line_no}: label '{cells[1]}' is not one of {known}")
            labels[cells[0]] = LABEL_WORDS[word]
    if not labels:
        raise SarkitError(f"{path}: no seed labels in the file")
    return labels


def standardise(matrix: np.ndarray, fit_rows: np.ndarray | None = None) -> np.ndarray:
    """Zero mean, unit variance per feature (scikit-learn's StandardScaler).

    Fitted on ``fit_rows`` (the tiles the kNN decides) when there are enough of them, so
    rule failures far out in feature space (a flat tile's zero entropy) do not squash the
    differences that matter among the rest.
    """
    from sklearn.preprocessing import StandardScaler

    fit = matrix if fit_rows is None or int(np.sum(fit_rows)) < 3 else matrix[fit_rows]
    return StandardScaler().fit(fit).transform(matrix)


def knn_scores(
    matrix: np.ndarray,
    seed_index: np.ndarray,
    seed_keep: np.ndarray,
    k: int,
    fit_rows: np.ndarray | None = None,
) -> np.ndarray:
    """P(keep) for every row from its k nearest seeds (distance-weighted, self excluded).

    A seed is scored by its neighbours among the *other* seeds, so its score says whether
    the rest of the seed set agrees with it. k is capped at the smaller class's seed count.
    """
    from sklearn.neighbors import NearestNeighbors

    n_seeds = len(seed_index)
    # never more neighbours than the smaller class has seeds (minus the tile itself): with
    # three hand-labelled keeps and k = 7, a tile among them could never win its vote
    smaller = int(min(seed_keep.sum(), (~seed_keep).sum()))
    k_eff = max(1, min(k, smaller - 1 if smaller > 1 else 1, n_seeds - 1))
    x = standardise(matrix, fit_rows)
    nn = NearestNeighbors(n_neighbors=min(k_eff + 1, n_seeds)).fit(x[seed_index])
    dist, idx = nn.kneighbors(x)
    seed_pos = np.full(len(x), -1)
    seed_pos[seed_index] = np.arange(n_seeds)
    # drop each seed's own entry; others drop their farthest extra neighbour
    own = idx == seed_pos[:, None]
    keep_cols = ~own
    over = keep_cols.sum(axis=1) > k_eff
    last = np.where(over)[0]
    keep_cols[last, -1] = False
    dist = np.where(keep_cols, dist, np.inf)
    weights = np.where(keep_cols, 1.0 / (dist + 1e-6), 0.0)
    votes = seed_keep[idx].astype(np.float64)
    total = weights.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        score = (weights * votes).sum(axis=1) / total
    return np.nan_to_num(score, nan=0.5)
