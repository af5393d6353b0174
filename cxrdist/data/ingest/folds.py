"""Patient-grouped, multilabel-stratified folds whose IMAGE-level label prevalence matches overall.

1. Labels are aggregated per patient (positive if any of its images is) and the patients are split
   by Multilabel Iterative Stratification (iterative-stratification): no patient in two splits.
2. MIS sees one row per patient, so a fold that drew patients with many images is off at the image
   level (up to 0.56 percentage points on CheXpert; iterstrat binarises, so weights cannot help).
   A local search then moves single patients and swaps pairs of patients between splits while that
   lowers
       sum over splits g of (|positives_g - images_g * overall prevalence|^2
                             + SIZE_WEIGHT^2 (images_g - share_g * all images)^2) / share_g^2,
   i.e. every split's positives of every label as close as possible to what its size calls for, and
   every split's size close to its share. Each step takes the pair of splits whose deviations differ
   most and applies the best of: any one patient moved either way (evaluated for all members at
   once), or a swap among each side's best movers plus a random sample. Patients with many images
   are the big levers, single-image patients the fine tuning. einsum rather than BLAS: no thread
   pool fighting other processes for the cores, and the same sums on every machine.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from iterstrat.ml_stratifiers import MultilabelStratifiedKFold, MultilabelStratifiedShuffleSplit

from cxrdist.atomic import atomic_open
from cxrdist.errors import UserError
from cxrdist.layout import TEST_SPLIT, fold_index, fold_name, fold_sort_key, is_fold

ASSIGNMENT_COLUMNS = ["path", "patient", "split"]

# One image of size error costs as much as SIZE_WEIGHT positives of label error. Prevalences must
# be within ~0.02 percentage points and sizes within ~1%, so (0.0002 / 0.005) = 0.04 would treat
# both goals alike; on small data the prevalences sit at their integer floor (one positive is
# 0.025 pp of a 4,000-image fold) and 0.04 or 0.1 let sizes drift to ~0.8% for nothing, while 0.3
# keeps them within ~0.2% at no measurable cost in prevalence, on 20k and 224k images alike.
SIZE_WEIGHT = 0.3
SWAP_SAMPLE = 96  # patients drawn from each side of a pair of splits to try swaps among
MAX_STEPS = 20_000
MIN_GAIN = 1e-6  # in squared positives; anything smaller is rounding noise
PATIENCE_ROUNDS = 2  # rounds in which every pair of splits failed, in a row, before stopping


def positives_matrix(raw: np.ndarray) -> np.ndarray:
    """Raw labels (1 / 0 / -1 uncertain / NaN blank) -> bool (n_images, n_labels), True where == 1."""
    raw = np.asarray(raw, dtype=float)
    if raw.ndim != 2:
        raise ValueError(f"expected a 2-D label matrix, got shape {raw.shape}")
    return raw == 1


def stratification_matrix(raw: np.ndarray) -> np.ndarray:
    """What the folds are stratified on: the positives, plus one column per label that has uncertain
    (-1) entries, True where uncertain. Under U-Ones those entries are training positives (and under
    U-Ignore missing ones), so they must be spread over the folds as evenly as the positives."""
    raw = np.asarray(raw, dtype=float)
    uncertain = positives_matrix(-raw)
    return np.column_stack([positives_matrix(raw), uncertain[:, uncertain.any(axis=0)]])


def assign_splits(
    patients: Sequence[str],
    positives: np.ndarray,
    n_folds: int,
    seed: int = 0,
    test_fraction: float = 0.0,
    test_patients: Collection[str] | None = None,
    balance: bool = True,
) -> np.ndarray:
    """Split name per image: "fold-0" .. f"fold-{n_folds-1}" and, optionally, "test".

    The test split is either the images of `test_patients` or, with `test_fraction` > 0, a
    patient-grouped stratified share of about that fraction of the images. The folds come from the
    remaining patients. With balance=False the patient-level folds are exactly
    MultilabelStratifiedKFold(n_folds, shuffle=True, random_state=seed) on the patients (sorted by
    id, one row each, positive if any image is); balance=True refines them at the image level.
    """
    positives = np.asarray(positives, dtype=bool)
    patient_ids, patient_of_image = np.unique(np.asarray(patients).astype(str), return_inverse=True)
    if positives.ndim != 2 or positives.shape[0] != patient_of_image.size:
        raise ValueError(f"positives has shape {positives.shape}, expected ({patient_of_image.size}, n_labels)")
    _check_split_request(n_folds, test_fraction, test_patients)
    images = np.bincount(patient_of_image, minlength=patient_ids.size)
    patient_positives = np.zeros((patient_ids.size, positives.shape[1]), dtype=np.int64)
    np.add.at(patient_positives, patient_of_image, positives)
    rng = np.random.default_rng(seed)

    is_test = np.zeros(patient_ids.size, dtype=bool)
    if test_patients is not None:
        is_test = np.isin(patient_ids, np.asarray(list(map(str, test_patients))))
        if not is_test.any():
            raise UserError(f"none of the {len(test_patients)} test-list patients has an image in the labels")
    elif test_fraction > 0:
        is_test = _test_patients(images, patient_positives, test_fraction, seed, rng if balance else None)

    rest = np.flatnonzero(~is_test)
    if rest.size < n_folds:
        raise UserError(f"cannot make {n_folds} folds from {rest.size} patients (outside the test split)")
    fold = _stratified_folds(patient_positives[rest] > 0, n_folds, seed)
    if balance:
        shares = np.full(n_folds, 1 / n_folds)
        fold = _rebalance(fold, images[rest], patient_positives[rest], shares, rng)

    names = np.array([fold_name(k) for k in range(n_folds)] + [TEST_SPLIT], dtype=object)
    split_of_patient = np.full(patient_ids.size, n_folds)
    split_of_patient[rest] = fold
    return names[split_of_patient[patient_of_image]]


def _check_split_request(n_folds: int, test_fraction: float, test_patients: Collection[str] | None) -> None:
    if n_folds < 2:
        raise UserError(f"folds: need at least 2, got {n_folds}")
    if not 0 <= test_fraction < 1:
        raise UserError(f"test fraction must be in [0, 1), got {test_fraction}")
    if test_patients is not None and test_fraction > 0:
        raise UserError("give either a test fraction or a test list, not both")


def _mis_input(patient_any: np.ndarray) -> np.ndarray:
    # iterstrat insists on a multilabel matrix (>= 2 columns); an all-False column changes nothing.
    if patient_any.shape[1] >= 2:
        return patient_any
    return np.column_stack([patient_any, np.zeros((patient_any.shape[0], 2 - patient_any.shape[1]), bool)])


def _stratified_folds(patient_any: np.ndarray, n_folds: int, seed: int) -> np.ndarray:
    """Fold index per patient from MultilabelStratifiedKFold on the per-patient labels."""
    y = _mis_input(patient_any)
    mis = MultilabelStratifiedKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    fold = np.empty(y.shape[0], dtype=np.int64)
    for k, (_, members) in enumerate(mis.split(np.zeros((y.shape[0], 1)), y)):
        fold[members] = k
    return fold


def _test_patients(
    images: np.ndarray,
    patient_positives: np.ndarray,
    test_fraction: float,
    seed: int,
    rng: np.random.Generator | None,
) -> np.ndarray:
    """Bool per patient: a stratified ~test_fraction of the patients, rebalanced toward that
    fraction of the IMAGES when rng is given."""
    y = _mis_input(patient_positives > 0)
    if y.shape[0] < 2:
        raise UserError("a test fraction needs at least 2 patients")
    mis = MultilabelStratifiedShuffleSplit(n_splits=1, test_size=test_fraction, random_state=seed)
    try:
        _, members = next(mis.split(np.zeros((y.shape[0], 1)), y))
    except ValueError as error:  # e.g. nothing left outside the test split
        raise UserError(f"test fraction {test_fraction} of {y.shape[0]} patients: {error}") from None
    group = np.ones(y.shape[0], dtype=np.int64)
    group[members] = 0
    if rng is not None:
        group = _rebalance(group, images, patient_positives, np.array([test_fraction, 1 - test_fraction]), rng)
    return group == 0


def _rebalance(
    group: np.ndarray,
    images: np.ndarray,
    patient_positives: np.ndarray,
    shares: np.ndarray,
    rng: np.random.Generator,
) -> np.ndarray:
    """Local search over patient moves and swaps between groups (see the module docstring)."""
    group = group.copy()
    n_groups = shares.size
    prevalence = patient_positives.sum(axis=0) / images.sum()
    # Per patient: its positives beyond what its image count calls for, and its weighted size.
    vectors = np.column_stack([patient_positives - np.outer(images, prevalence), SIZE_WEIGHT * images])
    targets = np.zeros((n_groups, vectors.shape[1]))
    targets[:, -1] = SIZE_WEIGHT * images.sum() * shares
    deviation = np.stack([vectors[group == g].sum(axis=0) for g in range(n_groups)]) - targets
    weight = 1 / shares**2
    norms = np.einsum("ij,ij->i", vectors, vectors)
    # stale[a, b]: the pair failed to improve and neither group changed since (only new swap
    # samples could help it now).
    stale = np.eye(n_groups, dtype=bool)
    idle_rounds = 0
    for _ in range(MAX_STEPS):
        if stale.all():
            idle_rounds += 1
            if idle_rounds >= PATIENCE_ROUNDS:
                break
            stale = np.eye(n_groups, dtype=bool)
        a, b = _most_promising_pair(deviation, weight, stale)
        if _improve_pair(a, b, group, vectors, norms, deviation, weight, rng):
            idle_rounds = 0
            stale[[a, b], :] = stale[:, [a, b]] = False
            np.fill_diagonal(stale, True)
        else:
            stale[a, b] = stale[b, a] = True
    return group


def _most_promising_pair(deviation: np.ndarray, weight: np.ndarray, stale: np.ndarray) -> tuple[int, int]:
    """The non-stale pair of groups whose weighted deviations differ most."""
    weighted = weight[:, None] * deviation
    gap = ((weighted[:, None, :] - weighted[None, :, :]) ** 2).sum(axis=2)
    gap[stale] = -1
    a, b = np.unravel_index(np.argmax(gap), gap.shape)
    return int(a), int(b)


def _improve_pair(
    a: int,
    b: int,
    group: np.ndarray,
    vectors: np.ndarray,
    norms: np.ndarray,
    deviation: np.ndarray,
    weight: np.ndarray,
    rng: np.random.Generator,
) -> bool:
    """Apply the best of: one patient a->b, one b->a, one sampled swap; True if it lowered the cost.
    Updates group and deviation in place."""
    in_a = np.flatnonzero(group == a)
    in_b = np.flatnonzero(group == b)
    if in_a.size == 0 or in_b.size == 0:
        return False
    vectors_a, vectors_b = vectors.take(in_a, axis=0), vectors.take(in_b, axis=0)
    w_ab = weight[a] + weight[b]
    toward_b = weight[b] * deviation[b] - weight[a] * deviation[a]
    # Cost change of moving v from a to b: w_a(|v|^2 - 2 v.dev_a) + w_b(|v|^2 + 2 v.dev_b).
    move_ab = w_ab * norms.take(in_a) + 2 * np.einsum("ij,j->i", vectors_a, toward_b)
    move_ba = w_ab * norms.take(in_b) - 2 * np.einsum("ij,j->i", vectors_b, toward_b)
    best_ab, best_ba = int(np.argmin(move_ab)), int(np.argmin(move_ba))
    # Swapping p (in a) and q (in b) costs move_ab[p] + move_ba[q] - 2 (w_a + w_b) v_p.v_q; tried
    # among each side's best movers and a random sample.
    from_a = _swap_candidates(move_ab, rng)
    from_b = _swap_candidates(move_ba, rng)
    cross = np.einsum("ik,jk->ij", vectors_a.take(from_a, axis=0), vectors_b.take(from_b, axis=0))
    swap = move_ab[from_a][:, None] + move_ba[from_b][None, :] - 2 * w_ab * cross
    i, j = np.unravel_index(np.argmin(swap), swap.shape)
    best_swap = (from_a[i], from_b[j])

    options = [
        move_ab[best_ab] if in_a.size > 1 else np.inf,  # never empty a group
        move_ba[best_ba] if in_b.size > 1 else np.inf,
        swap[i, j],
    ]
    choice = int(np.argmin(options))
    if not options[choice] < -MIN_GAIN:
        return False
    if choice == 0:
        _move(in_a[best_ab], a, b, group, vectors, deviation)
    elif choice == 1:
        _move(in_b[best_ba], b, a, group, vectors, deviation)
    else:
        _move(in_a[best_swap[0]], a, b, group, vectors, deviation)
        _move(in_b[best_swap[1]], b, a, group, vectors, deviation)
    return True


def _swap_candidates(move_cost: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Positions of the SWAP_SAMPLE // 2 cheapest movers plus as many drawn at random."""
    half = SWAP_SAMPLE // 2
    if move_cost.size <= SWAP_SAMPLE:
        return np.arange(move_cost.size)
    cheapest = np.argpartition(move_cost, half)[:half]
    return np.unique(np.concatenate([cheapest, rng.choice(move_cost.size, size=half, replace=False)]))


def _move(patient: int, source: int, dest: int, group: np.ndarray, vectors: np.ndarray, deviation: np.ndarray) -> None:
    group[patient] = dest
    deviation[source] -= vectors[patient]
    deviation[dest] += vectors[patient]


def check_scorable_splits(splits: np.ndarray, raw: np.ndarray) -> None:
    """Refuse a split on which no label has both a positive and a negative image (a test split of one image, a fold of a
    few patients): no AUC, hence no model selection or result, could ever be computed on it. Judged under the strictest
    evaluation rule (uncertain entries left out), so every rule can score what passes."""
    from cxrdist.labels.eval_targets import evaluation_targets

    targets, mask = evaluation_targets(raw)
    splits = np.asarray(splits).astype(str)
    for name in _ordered_split_names(splits):
        rows = splits == name
        scored = mask[rows] > 0
        positive, negative = ((targets[rows] == 1) & scored).any(axis=0), ((targets[rows] == 0) & scored).any(axis=0)
        if not (positive & negative).any():
            more = "hold out more patients (--test-fraction) or list more (--test-list)" if name == TEST_SPLIT else "use fewer --folds"
            raise UserError(f"the {name} split has {int(rows.sum())} image(s) and no label with both a positive and a negative among "
                            f"them, so no AUC can be computed on it; {more}")


def split_balance(
    splits: np.ndarray, patients: Sequence[str], positives: np.ndarray, label_names: Sequence[str]
) -> dict:
    """Per-split sizes and prevalences, and how far the folds' prevalences stray from the overall
    prevalence (over the images in the folds; the test split is reported as test_deviation)."""
    splits = np.asarray(splits).astype(str)
    patients = np.asarray(patients).astype(str)
    positives = np.asarray(positives, dtype=bool)
    names = _ordered_split_names(splits)
    folds = [name for name in names if name != TEST_SPLIT]
    in_folds = np.isin(splits, folds) if folds else np.ones(splits.size, dtype=bool)

    def summary(mask: np.ndarray) -> dict:
        prevalence = positives[mask].mean(axis=0) if mask.any() else np.zeros(len(label_names))
        return {
            "num_samples": int(mask.sum()),
            "num_patients": int(np.unique(patients[mask]).size),
            "prevalence": dict(zip(label_names, map(float, prevalence))),
        }

    per_split = {name: summary(splits == name) for name in names}
    overall = summary(in_folds)

    def deviation_from_overall(name: str) -> np.ndarray:
        return np.abs(
            np.array(list(per_split[name]["prevalence"].values())) - np.array(list(overall["prevalence"].values()))
        )

    fold_deviation = np.max([deviation_from_overall(f) for f in folds], axis=0) if folds else np.zeros(len(label_names))
    sizes = np.array([per_split[f]["num_samples"] for f in folds], dtype=float)
    balance = {
        "splits": per_split,
        "overall": overall,
        "max_deviation": dict(zip(label_names, map(float, fold_deviation))),
        "max_deviation_overall": float(fold_deviation.max(initial=0.0)),
        "size_spread": float((sizes.max() - sizes.min()) / sizes.mean()) if sizes.size else 0.0,
        "patients_in_several_splits": int(
            (pd.DataFrame({"patient": patients, "split": splits}).groupby("patient")["split"].nunique() > 1).sum()
        ),
    }
    if TEST_SPLIT in per_split:
        balance["test_deviation"] = dict(zip(label_names, map(float, deviation_from_overall(TEST_SPLIT))))
    return balance


def format_balance(balance: dict) -> str:
    """A readable table: a row per label with every split's prevalence (%), the overall one, the
    folds' largest deviation (percentage points); then sizes, patients and leaks."""
    names = list(balance["splits"])
    labels = list(balance["overall"]["prevalence"])
    has_test = "test_deviation" in balance
    width = max([len(label) for label in labels] + [len("patients in several splits")]) + 2
    header = (
        "label".ljust(width)
        + "".join(name.rjust(10) for name in names)
        + "overall".rjust(10)
        + "max dev pp".rjust(12)
        + ("test dev pp".rjust(13) if has_test else "")
    )
    lines = [header, "-" * len(header)]
    for label in labels:
        row = label.ljust(width) + "".join(
            f"{100 * balance['splits'][name]['prevalence'][label]:9.3f}%" for name in names
        )
        row += f"{100 * balance['overall']['prevalence'][label]:9.3f}%"
        row += f"{100 * balance['max_deviation'][label]:12.4f}"
        if has_test:
            row += f"{100 * balance['test_deviation'][label]:13.4f}"
        lines.append(row)
    lines.append("-" * len(header))
    for key, title in [("num_samples", "images"), ("num_patients", "patients")]:
        lines.append(title.ljust(width) + "".join(f"{balance['splits'][n][key]:10d}" for n in names))
    lines.append(
        f"largest fold deviation {100 * balance['max_deviation_overall']:.4f} pp; "
        f"fold size spread {100 * balance['size_spread']:.2f}%; "
        f"patients in several splits: {balance['patients_in_several_splits']}"
    )
    return "\n".join(lines)


def write_assignment(path: Path, paths: Sequence[str], patients: Sequence[str], splits: Sequence[str]) -> None:
    """Write the split assignment CSV (columns path, patient, split) atomically."""
    path = Path(path)
    table = pd.DataFrame({"path": list(paths), "patient": list(patients), "split": list(splits)})
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_open(path, "w", newline="") as stream:
        table.to_csv(stream, index=False)


def read_assignment(path: Path) -> pd.DataFrame:
    """Read and check a split assignment CSV written by write_assignment."""
    path = Path(path)
    try:
        table = pd.read_csv(path, dtype=str, keep_default_na=False)
    except FileNotFoundError:
        raise UserError(f"{path}: split assignment file not found") from None
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as error:
        raise UserError(f"{path}: not a readable CSV ({str(error).splitlines()[0]})") from None
    missing = [column for column in ASSIGNMENT_COLUMNS if column not in table.columns]
    if missing:
        raise UserError(f"{path}: missing column(s) {', '.join(missing)} (need {', '.join(ASSIGNMENT_COLUMNS)})")
    table = table[ASSIGNMENT_COLUMNS]
    _check_assignment(path, table)
    return table


def _check_assignment(path: Path, table: pd.DataFrame) -> None:
    for column in ASSIGNMENT_COLUMNS:
        empty = np.flatnonzero(table[column].str.strip() == "")
        if empty.size:
            raise UserError(f"{path}: line {empty[0] + 2}: empty {column}")
    bad = np.flatnonzero([not (is_fold(name) or name == TEST_SPLIT) for name in table["split"]])
    if bad.size:
        raise UserError(
            f"{path}: line {bad[0] + 2}: split {table['split'].iloc[bad[0]]!r} is not fold-N or {TEST_SPLIT}"
        )
    folds = {name for name in table["split"] if name != TEST_SPLIT}
    expected = {fold_name(k) for k in range(len(folds))}
    if len(folds) < 2 or folds != expected:
        raise UserError(f"{path}: splits must include fold-0 .. fold-K-1 with K >= 2, found {sorted(folds)}")
    duplicated = table["path"].duplicated()
    if duplicated.any():
        raise UserError(f"{path}: path {table['path'][duplicated].iloc[0]!r} is listed twice")
    splits_per_patient = table.groupby("patient")["split"].nunique()
    leaking = splits_per_patient.index[splits_per_patient > 1]
    if len(leaking):
        raise UserError(f"{path}: patient {leaking[0]!r} has images in more than one split")


def _ordered_split_names(splits: np.ndarray) -> list[str]:
    """Folds by number, then the test split, then anything else."""
    present = set(splits.tolist())
    folds = sorted((name for name in present if fold_index(name) is not None), key=fold_sort_key)
    rest = sorted(present - set(folds) - {TEST_SPLIT})
    return folds + rest + ([TEST_SPLIT] if TEST_SPLIT in present else [])
