"""CLIMB's mixture search: sample mixtures, score them, fit a predictor, propose better ones, repeat.

CLIMB (CLustering-based Iterative data Mixture Bootstrapping, arXiv 2504.13161) searches mixture weights over
clusters of the training data. This module is the search alone: the objective (a short proxy run per mixture,
scored on a dev split) is any callable ``objective(mixture: dict[str, float]) -> float``, **higher = better**.
No Prefect, no training here; every knob is one named argument with its default a module constant below.

The story, top to bottom:

1. **Prior** (``prior_shares``): each cluster's token share, flattened by a temperature (0.5): share ** t,
   renormalised. It is the mean of every mixture the sampler draws.
2. **Sampler** (``sample_mixtures``): a Dirichlet around the prior with a random concentration, rejecting
   mixtures that up-weight a cluster more than ``max_ratio`` (15) x its token share and zeroing weights below
   ``min_weight`` (2e-4).
3. **Budgets** (``round_budgets``): the proxy-run budget split 4:2:1 over 3 rounds (64/32/16 in the paper).
4. **Round 1** scores sampler draws. **Round r > 1** fits the predictor (``fit_predictor``: LightGBM on every
   (mixture, score) pair so far), scores 100k sampler draws with it, keeps the predicted top max(n^2, 128) and
   picks n of them at random (``propose``) -- exploit the predictor, yet keep the round diverse.
5. **Output** (``search`` -> ``SearchResult``): after the last round the predictor is fitted on all pairs and
   its best mixture among a fresh candidate draw is CLIMB's answer. The best *observed* mixture is reported too.

Followed from the references (read at sail-sg/regmix HEAD and NVIDIA-NeMo/Curator HEAD 1e2e427):

- regmix ``mixture_config/synthesize_mixture.py`` (``generate_weights_dirichlet``; NeMo Curator's
  ``tutorials/text/nemotron-climb-data-curation/5_mixture.py`` is the same code with arguments):
  the concentration ("strength") is one of 15 values log-spaced over [0.1, 5] (``np.logspace``), drawn uniformly
  per sample (regmix draws one Dirichlet per strength and keeps one at random: the same distribution, fewer
  draws); the Dirichlet's alpha is tempered prior x strength; the upper bound is ``min(max_ratio * share, 1)``
  with ``share`` the *un-tempered* token share (regmix computes the bound before applying the temperature);
  weights below ``min_weight`` are set to 0 and the row renormalised; at most ``SAMPLE_MULTIPLIER`` (100) draws
  per wanted mixture (regmix's loop length; NeMo raises when too few survive, so do we).
- NeMo Curator ``tutorials/text/nemotron-climb-data-curation/8_predict.py`` (``fit_predictor``,
  ``generate_mixtures``) and regmix ``regression_fitting/regression.ipynb``: LGBMRegressor(gbdt, regression,
  metric l1+l2, up to 1000 trees, lr 1e-2, max_depth 4, min_child_samples 5, reg_alpha = reg_lambda = 1);
  early stopping on a held-out 10 % of the shuffled pairs (eval l2), patience min(20, held-out size);
  proposals: top max(n^2, 128) by prediction, n drawn without replacement, the argmax when n = 1; 100k candidates.
  (``eval_X``/``eval_y`` replace NeMo's ``eval_set``, deprecated in LightGBM 4.7.)

Where this module differs, and why:

- The bound is checked *after* zeroing and renormalising (regmix checks before), so every returned weight
  respects it (renormalising can lift a weight over it by a hair).
- No rounding of weights to multiples of ``min_weight`` and no de-duplication: regmix does both to write config
  files; here rows are floats that sum to 1 and continuous draws do not repeat.
- NeMo's ``8_predict.py`` draws its 100k candidates from Dirichlet(token share) (concentration 1, no bound,
  no temperature); here candidates come from the same bounded sampler as round 1, so a proposal never breaks
  the ``max_ratio`` bound the proxy runs were sampled under.
- The predictor's best mixture (CLIMB's output, and a proposal when n = 1) is the *mean of the candidates tied
  at the predicted maximum*, not NeMo's ``np.argmax`` (the first of them): a tree ensemble is piecewise
  constant, so hundreds of candidates tie, and the first is an arbitrary, often spiky draw. On the synthetic
  objective of tests/test_climb.py (5 clusters, interior optimum; mean over 8 seeds, 20k candidates) it halves
  the chosen mixture's distance to the optimum: 28 calls 0.38 -> 0.16, 112 calls 0.17 -> 0.08 (the prior is
  0.21 away). See ``best_candidate``.
- Small fits: the held-out split is used only when its training part has >= 2 x min_child_samples points
  (else LightGBM cannot split at all); below that the predictor is fitted on every point for
  ``FALLBACK_TREES`` trees. With < 10 points it is a constant: ``propose`` then returns plain sampler draws and
  the output is the mean of all candidates, i.e. about the prior -- no information, no move.
- NeMo fits the final predictor on 90 % of the pairs (the rest is its early-stopping fold); so does this.

Resumability: round r's mixtures depend only on (seed, r, the (mixture, score) pairs before it); the sampler
uses ``np.random.default_rng([seed, r])`` and LightGBM is deterministic. A caller that caches each objective
call by its mixture (e.g. ``json.dumps(mixture)``: float reprs round-trip exactly) can re-run a killed
``search``, and only the missing mixtures are evaluated again.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

#: Exponent on the token shares for the Dirichlet prior (CLIMB / regmix TEMP).
TEMPERATURE = 0.5
#: Dirichlet concentration range; one of N_STRENGTHS log-spaced values is drawn per mixture (regmix
#: MIN_STRENGH / MAX_STRENGH; small = spiky mixtures, large = close to the prior).
MIN_STRENGTH = 0.1
MAX_STRENGTH = 5.0
N_STRENGTHS = 15
#: Reject a mixture when a cluster's weight exceeds this many times its token share (regmix MAXIMUM_USAGE: how
#: many epochs of a cluster a full-scale run may repeat).
MAX_RATIO = 15.0
#: Weights below this are set to 0 (regmix MINIMUM: ~100 examples of a 1B-token proxy run).
MIN_WEIGHT = 2e-4
#: Draws allowed per wanted mixture before the sampler gives up (regmix SAMPLE_MULTIPLIER).
SAMPLE_MULTIPLIER = 100
#: Candidates scored by the predictor per proposal (NeMo 8_predict.py --num-samples).
N_CANDIDATES = 100_000
#: Proposals come from the predicted top max(n^2, TOP_MIN) candidates (NeMo generate_mixtures).
TOP_MIN = 128
#: Budget split over rounds (CLIMB: 64/32/16 proxy runs).
ROUND_RATIOS = (4, 2, 1)
#: LightGBM regressor settings (NeMo 8_predict.py; regmix regression.ipynb), plus determinism and silence.
LGBM_PARAMS: dict[str, Any] = {
    "boosting_type": "gbdt",
    "objective": "regression",
    "metric": ["l1", "l2"],  # early stopping watches both: it stops when either stalls (NeMo, regmix)
    "n_estimators": 1000,  # upper bound; early stopping picks the number of trees
    "learning_rate": 1e-2,
    "max_depth": 4,
    "min_child_samples": 5,
    "reg_alpha": 1.0,
    "reg_lambda": 1.0,
    "verbose": -1,
    "deterministic": True,  # with force_col_wise, LightGBM's documented recipe for bit-identical refits
    "force_col_wise": True,
    "n_jobs": 1,  # a few hundred points: threads only cost, and a fixed count keeps results reproducible
}
#: Early stopping (NeMo): hold out this fraction of the shuffled pairs, stop after min(patience, held-out size)
#: trees without improvement of the held-out l2.
HOLDOUT_FRACTION = 0.1
EARLY_STOPPING_PATIENCE = 20
#: Trees fitted without early stopping when the pairs are too few for a held-out fold.
FALLBACK_TREES = 100


# ------------------------------------------------------------------------------------------------------ prior
def prior_shares(sizes: Mapping[str, float], temperature: float) -> dict[str, float]:
    """CLIMB's prior over clusters: (size_i / total) ** temperature, renormalised; input key order kept.

    ``sizes`` are token counts (any non-negative measure works: only ratios matter). temperature 1 gives the
    plain token share, 0 the uniform prior over non-empty clusters.
    """
    from branchmerge.models.data.mixing import mixture_weights

    _check_sizes(sizes)
    return mixture_weights(sizes, strategy="proportional", temperature=temperature)


def _check_sizes(sizes: Mapping[str, float]) -> None:
    if not isinstance(sizes, Mapping) or not sizes:
        raise ValueError(f"sizes must be a non-empty mapping cluster name -> token count, got {sizes!r}")
    for name, size in sizes.items():
        if not isinstance(name, str):
            raise TypeError(f"sizes: cluster names must be str, got {name!r}")
        if not isinstance(size, (int, float, np.integer, np.floating)) or not math.isfinite(size) or size < 0:
            raise ValueError(f"sizes[{name!r}] = {size!r}; sizes must be finite numbers >= 0")
    if sum(float(s) for s in sizes.values()) <= 0:
        raise ValueError(f"sizes are all 0 ({dict(sizes)}); the token-share prior is undefined")


def _distribution(x: Any, name: str, k: int | None = None) -> np.ndarray:
    """1-D, finite, >= 0, positive sum; returned normalised to sum 1."""
    a = np.asarray(x, dtype=np.float64)
    if a.ndim != 1 or a.size == 0:
        raise ValueError(f"{name} must be a non-empty 1-D array, got shape {a.shape}")
    if k is not None and a.size != k:
        raise ValueError(f"{name} has {a.size} entries, expected {k} (one per cluster)")
    if not np.isfinite(a).all() or (a < 0).any() or a.sum() <= 0:
        raise ValueError(f"{name} must be finite, >= 0 and not all 0, got {a.tolist()}")
    return a / a.sum()


# ---------------------------------------------------------------------------------------------------- sampler
def sample_mixtures(
    prior: Sequence[float] | np.ndarray,
    n: int,
    rng: np.random.Generator,
    *,
    shares: Sequence[float] | np.ndarray | None = None,
    max_ratio: float = MAX_RATIO,
    min_weight: float = MIN_WEIGHT,
    min_strength: float = MIN_STRENGTH,
    max_strength: float = MAX_STRENGTH,
) -> np.ndarray:
    """``n`` mixtures [n, k] from regmix's bounded Dirichlet sampler.

    Each row: strength ~ uniform over N_STRENGTHS log-spaced values in [min_strength, max_strength];
    w ~ Dirichlet(prior * strength); weights < ``min_weight`` -> 0, row renormalised; rejected if any
    w_i > min(max_ratio * shares_i, 1). ``shares`` (the bound's reference) defaults to ``prior``; ``search``
    passes the un-tempered token share, as regmix does. Clusters with prior 0 always get weight 0.
    Guarantees: rows sum to 1, w_i <= max_ratio * shares_i, no weight in (0, min_weight).
    Raises RuntimeError when fewer than n of n * SAMPLE_MULTIPLIER draws survive the bound.
    """
    p = _distribution(prior, "prior")
    s = p if shares is None else _distribution(shares, "shares", p.size)
    if not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"n must be an int >= 1, got {n!r}")
    if not max_ratio > 0:  # also rejects NaN
        raise ValueError(f"max_ratio must be > 0, got {max_ratio!r}")
    support = p > 0
    k = int(support.sum())
    if not 0 <= min_weight < 1 / k:  # a row's largest weight is >= 1/k, so the zeroing never empties a row
        raise ValueError(f"min_weight must be in [0, 1/{k}) (k = clusters with prior > 0), got {min_weight!r}")
    if not 0 < min_strength <= max_strength < math.inf:
        raise ValueError(f"need 0 < min_strength <= max_strength < inf, got {min_strength!r}, {max_strength!r}")
    strengths = np.logspace(np.log10(min_strength), np.log10(max_strength), N_STRENGTHS)
    # inf * 0 would be NaN; a cluster with no tokens may not be sampled at all
    bound = np.where(s > 0, np.minimum(max_ratio * s, 1.0), 0.0)

    kept: list[np.ndarray] = []
    n_kept, drawn, max_draws = 0, 0, int(n) * SAMPLE_MULTIPLIER
    while n_kept < n:
        # batch size depends only on (n, n_kept): the stream of draws is a function of the seed alone
        m = min(max(2 * (n - n_kept), 1024), max_draws - drawn)
        if m <= 0:
            raise RuntimeError(
                f"sample_mixtures: only {n_kept} of {max_draws} draws respected the bound max_ratio={max_ratio} x "
                f"share (wanted n={n}); raise max_ratio or the temperature"
            )
        drawn += m
        which = rng.integers(N_STRENGTHS, size=m)
        w = np.zeros((m, p.size))
        for j, strength in enumerate(strengths):
            rows = np.flatnonzero(which == j)
            if rows.size:
                w[np.ix_(rows, np.flatnonzero(support))] = rng.dirichlet(p[support] * strength, size=rows.size)
        w[w < min_weight] = 0.0
        w /= w.sum(axis=1, keepdims=True)
        ok = (w <= bound).all(axis=1)
        kept.append(w[ok][: n - n_kept])
        n_kept += kept[-1].shape[0]
    return np.concatenate(kept, axis=0)


# ---------------------------------------------------------------------------------------------------- budgets
def round_budgets(budget: int, ratios: Sequence[float]) -> list[int]:
    """Split ``budget`` objective calls over rounds in proportion to ``ratios`` (largest remainder).

    7 -> [4, 2, 1], 14 -> [8, 4, 2], 112 -> [64, 32, 16] with the default 4:2:1. Every round needs >= 1 call.
    """
    ratios = tuple(ratios)
    if not ratios or any(not isinstance(r, (int, float)) or not math.isfinite(r) or r <= 0 for r in ratios):
        raise ValueError(f"ratios must be a non-empty sequence of finite numbers > 0, got {ratios!r}")
    if isinstance(budget, bool) or not isinstance(budget, (int, np.integer)):
        raise TypeError(f"budget must be an int, got {budget!r}")
    exact = [budget * r / sum(ratios) for r in ratios]
    out = [math.floor(x) for x in exact]
    # hand the leftover calls to the largest fractional parts (ties: the earlier round)
    for i in sorted(range(len(ratios)), key=lambda i: (out[i] - exact[i], i))[: budget - sum(out)]:
        out[i] += 1
    if min(out) < 1:
        raise ValueError(
            f"budget={budget} is too small to split over {len(ratios)} rounds with ratios {ratios}: it gives "
            f"{out}, and every round needs at least one objective call"
        )
    return out


# -------------------------------------------------------------------------------------------------- predictor
def holdout_split(n: int, seed: int) -> tuple[np.ndarray, np.ndarray] | None:
    """(train, held-out) indices for early stopping, or None when the points are too few for one.

    As NeMo's 8_predict.py: shuffle (seeded), first 90 % train, rest held out -- used only when the training
    part has >= 2 x min_child_samples points (fewer and LightGBM cannot make a single split).
    """
    order = np.random.default_rng(seed).permutation(n)
    cut = int(n * (1 - HOLDOUT_FRACTION))
    if cut < 2 * LGBM_PARAMS["min_child_samples"] or cut == n:
        return None
    return order[:cut], order[cut:]


def fit_predictor(X: np.ndarray, y: np.ndarray, seed: int):
    """LightGBM regressor score ~ mixture, fitted on all pairs (minus the early-stopping fold, see holdout_split).

    With a fold: up to 1000 trees, stopped after min(20, fold size) trees without a better fold l2 (NeMo).
    Without (fewer than 12 points): FALLBACK_TREES trees on every point. Deterministic for a fixed seed.
    """
    import lightgbm as lgb

    X = np.asarray(X, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if X.ndim != 2 or y.shape != (X.shape[0],) or X.shape[0] < 1:
        raise ValueError(f"fit_predictor: need X [n, k] and y [n] with n >= 1, got {X.shape} and {y.shape}")
    if not (np.isfinite(X).all() and np.isfinite(y).all()):
        raise ValueError("fit_predictor: X and y must be finite")
    split = holdout_split(X.shape[0], seed)
    params = dict(LGBM_PARAMS, random_state=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sklearn-API chatter (feature names etc.); LightGBM's own: verbose=-1
        if split is None:
            return lgb.LGBMRegressor(**dict(params, n_estimators=FALLBACK_TREES)).fit(X, y)
        train, held = split
        return lgb.LGBMRegressor(**params).fit(
            X[train], y[train],
            eval_X=(X[held],), eval_y=(y[held],),  # NeMo's eval_set=[(X, y)]; eval_set is deprecated in 4.7
            eval_metric="l2",
            callbacks=[lgb.early_stopping(min(EARLY_STOPPING_PATIENCE, held.size), verbose=False)],
        )


def _predict(model, X: np.ndarray) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return np.asarray(model.predict(np.asarray(X, dtype=np.float64)), dtype=np.float64)


def propose(
    predictor,
    prior: Sequence[float] | np.ndarray,
    n: int,
    rng: np.random.Generator,
    *,
    shares: Sequence[float] | np.ndarray | None = None,
    max_ratio: float = MAX_RATIO,
    min_weight: float = MIN_WEIGHT,
    n_candidates: int = N_CANDIDATES,
    top: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Next round's ``n`` mixtures and their predicted scores: ([n, k], [n]).

    ``n_candidates`` sampler draws are scored by the predictor; ``n`` are picked without replacement from the
    predicted top ``top`` (default max(n^2, TOP_MIN)) -- or the single best when n = 1 (NeMo generate_mixtures).
    """
    if not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"n must be an int >= 1, got {n!r}")
    if not isinstance(n_candidates, (int, np.integer)) or n_candidates < n:
        raise ValueError(f"n_candidates must be an int >= n={n}, got {n_candidates!r}")
    top = max(n * n, TOP_MIN) if top is None else top
    if not isinstance(top, (int, np.integer)) or top < n:
        raise ValueError(f"top must be an int >= n={n}, got {top!r}")
    cand = sample_mixtures(prior, n_candidates, rng, shares=shares, max_ratio=max_ratio, min_weight=min_weight)
    pred = _predict(predictor, cand)
    if n == 1:
        best, best_pred = best_candidate(predictor, cand, pred, min_weight=min_weight)
        return best[None], np.array([best_pred])
    pool = np.argsort(pred, kind="stable")[-min(top, n_candidates):]
    pick = rng.choice(pool, size=n, replace=False)
    return cand[pick], pred[pick]


def best_candidate(
    predictor, candidates: np.ndarray, predicted: np.ndarray, *, min_weight: float = MIN_WEIGHT
) -> tuple[np.ndarray, float]:
    """The predictor's best mixture among ``candidates``: (mixture [k], its predicted score).

    A boosted-tree predictor is piecewise constant on boxes, so hundreds of candidates often tie at the
    maximum, and NeMo's ``np.argmax`` returns the first -- an arbitrary, often extreme draw. This returns the
    mean of the tied candidates instead (weights < ``min_weight`` zeroed, renormalised): a box is convex, so
    when the ties share one box the mean is a maximiser too, and it is the stable one. When the mean predicts
    lower (ties from different boxes) or leaves the candidates' bound, the first argmax is returned as NeMo does.
    """
    top = float(predicted.max())
    tied = candidates[predicted == top]
    first = candidates[int(np.argmax(predicted))]
    mean = tied.mean(axis=0)
    mean[mean < min_weight] = 0.0
    mean /= mean.sum()
    # every candidate respects the sampler's bound, so their per-cluster max is a safe stand-in for it (the
    # mean stays under it unless renormalising after the zeroing lifts a weight)
    bound = candidates.max(axis=0)
    if tied.shape[0] > 1 and (mean <= bound).all() and _predict(predictor, mean[None])[0] >= top:
        return mean, top
    return first, top


# ----------------------------------------------------------------------------------------------------- search
@dataclass(frozen=True)
class Run:
    """One objective call: its round (1-based), mixture, score, and the score the predictor expected (None in
    round 1, which has no predictor)."""

    round: int
    mixture: dict[str, float]
    score: float
    predicted: float | None = None


@dataclass
class SearchResult:
    """Everything a search did and chose; ``to_json()`` is the artifact.

    ``chosen`` is CLIMB's answer (the final predictor's best candidate, ``chosen_predicted`` its predicted
    score; ``chosen_from`` "predictor", or "best_observed" when the predictor came out constant and the best
    scored mixture stands in, its score as the prediction); ``best_observed`` the best mixture actually scored.
    ``fit`` describes the final predictor.
    """

    names: list[str]
    shares: dict[str, float]
    prior: dict[str, float]
    budgets: list[int]
    runs: list[Run]
    chosen: dict[str, float]
    chosen_predicted: float
    chosen_from: str
    fit: dict[str, Any]
    settings: dict[str, Any]
    predictor: Any = field(default=None, repr=False, compare=False)  # the final LGBMRegressor; not serialised

    @property
    def best_observed(self) -> Run:
        return max(self.runs, key=lambda r: r.score)  # first of equal scores

    def scores_by_round(self) -> list[list[tuple[dict[str, float], float]]]:
        return [[(r.mixture, r.score) for r in self.runs if r.round == i] for i in range(1, len(self.budgets) + 1)]

    def predict(self, mixture: Mapping[str, float]) -> float:
        """The final predictor's score for one mixture (e.g. the prior, to compare with ``chosen``)."""
        if self.predictor is None:
            raise ValueError("this SearchResult has no predictor (it was loaded from JSON)")
        return float(_predict(self.predictor, mixture_vector(mixture, self.names)[None])[0])

    def to_dict(self) -> dict[str, Any]:
        rounds = []
        for i, runs in enumerate(self.scores_by_round(), start=1):
            mine = [r for r in self.runs if r.round == i]
            pred = [r.predicted for r in mine]
            rounds.append({
                "round": i,
                "budget": self.budgets[i - 1],
                "runs": [{"mixture": r.mixture, "score": r.score, "predicted": r.predicted} for r in mine],
                "best_score": max(s for _, s in runs) if runs else None,
                # the predictor that proposed this round, judged on mixtures it had not seen; None in round 1 and
                # when it predicted one score for the whole round (its proposals often all come from its tied top)
                "spearman_predicted_vs_observed": (
                    None if any(p is None for p in pred) else spearman(pred, [r.score for r in mine])
                ),
            })
        best = self.best_observed
        return {
            "method": "climb",
            "higher_is_better": True,
            "names": self.names,
            "shares": self.shares,
            "prior": self.prior,
            "settings": self.settings,
            "rounds": rounds,
            "predictor": self.fit,
            "chosen": {"mixture": self.chosen, "predicted_score": self.chosen_predicted, "from": self.chosen_from},
            "best_observed": {"round": best.round, "mixture": best.mixture, "score": best.score},
        }

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)


def mixture_vector(mixture: Mapping[str, float], names: Sequence[str]) -> np.ndarray:
    """A {cluster: weight} mapping as a vector in ``names`` order (missing clusters = 0), checked."""
    unknown = [c for c in mixture if c not in names]
    if unknown:
        raise ValueError(f"mixture has clusters {unknown} that are not among the clusters {list(names)}")
    v = np.array([float(mixture.get(c, 0.0)) for c in names])
    if not np.isfinite(v).all() or (v < 0).any() or abs(v.sum() - 1) > 1e-6:
        raise ValueError(f"mixture weights must be finite, >= 0 and sum to 1, got {dict(mixture)}")
    return v


def search(
    objective: Callable[[dict[str, float]], float],
    sizes: Mapping[str, float],
    *,
    budget: int,
    rounds: int,
    ratios: Sequence[float] | None,
    seed: int,
    temperature: float,
    max_ratio: float = MAX_RATIO,
    min_weight: float = MIN_WEIGHT,
    n_candidates: int = N_CANDIDATES,
    on_result: Callable[[Run], None] | None = None,
    map_rounds: Callable[[Callable, list], list] | None = None,
) -> SearchResult:
    """CLIMB's iterative search for the mixture over ``sizes``' clusters that maximises ``objective``.

    ``objective(mixture)`` gets {cluster: weight} (all clusters, ``sizes`` order, summing to 1) and returns a
    finite score, **higher = better** (negate a loss). ``budget`` objective calls are split over ``rounds`` by
    ``ratios`` (default 2^(rounds-1) : ... : 2 : 1, i.e. CLIMB's 4:2:1). ``sizes`` are the clusters' token
    counts (pass a prior with temperature=1 to use it as is). ``on_result(run)`` is called after each call.
    ``map_rounds(objective, mixtures)`` scores one round's mixtures (they are independent: e.g. as parallel Ray
    tasks) and returns their scores in order; by default, one call after another.
    """
    if not callable(objective):
        raise TypeError(f"objective must be callable, got {objective!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be an int >= 0, got {seed!r}")
    if isinstance(rounds, bool) or not isinstance(rounds, (int, np.integer)) or rounds < 1:
        raise ValueError(f"rounds must be an int >= 1, got {rounds!r}")
    ratios = tuple(2 ** (rounds - 1 - i) for i in range(rounds)) if ratios is None else tuple(ratios)
    if len(ratios) != rounds:
        raise ValueError(f"ratios {ratios} has {len(ratios)} entries but rounds={rounds}")
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature >= 0):
        raise ValueError(f"temperature must be a finite number >= 0, got {temperature!r}")
    budgets = round_budgets(budget, ratios)
    names = list(sizes)
    shares = prior_shares(sizes, 1.0)  # the bound's reference (regmix: before temperature)
    prior = prior_shares(sizes, temperature)
    p, s = np.array(list(prior.values())), np.array(list(shares.values()))
    sampler = {"shares": s, "max_ratio": max_ratio, "min_weight": min_weight}

    runs: list[Run] = []
    for r, n in enumerate(budgets, start=1):
        rng = np.random.default_rng([seed, r])  # round r depends on (seed, r, the runs so far) only
        if r == 1:
            mixtures, predicted = sample_mixtures(p, n, rng, **sampler), [None] * n
        else:
            model = fit_predictor(*_pairs(runs, names), seed=seed)
            mixtures, predicted = propose(model, p, n, rng, n_candidates=n_candidates, **sampler)
        round_mixtures = [{c: float(x) for c, x in zip(names, w)} for w in mixtures]
        # one call after another is lazy, so each result is reported (on_result) as soon as it exists
        scores = ((objective(dict(m)) for m in round_mixtures) if map_rounds is None
                  else map_rounds(objective, [dict(m) for m in round_mixtures]))
        for mixture, score, pred in zip(round_mixtures, scores, predicted, strict=True):
            if isinstance(score, bool) or not isinstance(score, (int, float, np.integer, np.floating)) \
                    or not math.isfinite(score):
                raise ValueError(f"objective returned {score!r} for mixture {mixture}; it must be a finite number")
            run = Run(r, mixture, float(score), None if pred is None else float(pred))
            runs.append(run)
            if on_result is not None:
                on_result(run)

    # CLIMB's output: the predictor fitted on every pair, maximised over a fresh candidate draw
    X, y = _pairs(runs, names)
    model = fit_predictor(X, y, seed=seed)
    cand = sample_mixtures(p, n_candidates, np.random.default_rng([seed, len(budgets) + 1]), **sampler)
    predicted = _predict(model, cand)
    if np.ptp(predicted) > 0:
        chosen, chosen_predicted = best_candidate(model, cand, predicted, min_weight=min_weight)
        chosen_from = "predictor"
    else:
        # a constant predictor learnt nothing (LightGBM cannot split fewer than 2 x min_child_samples points):
        # its "best candidate" would be the mean of all candidates, i.e. the prior. The best mixture actually
        # scored is the search's answer then.
        best = max(runs, key=lambda r: r.score)
        chosen, chosen_predicted = np.array([best.mixture[c] for c in names]), best.score
        chosen_from = "best_observed"
    return SearchResult(
        names=names,
        shares=shares,
        prior=prior,
        budgets=budgets,
        runs=runs,
        chosen={c: float(x) for c, x in zip(names, chosen)},
        chosen_predicted=chosen_predicted,
        chosen_from=chosen_from,
        fit=fit_quality(model, X, y, seed),
        settings={
            "budget": budget, "rounds": rounds, "ratios": list(ratios), "seed": seed, "temperature": temperature,
            "max_ratio": max_ratio, "min_weight": min_weight, "n_candidates": n_candidates,
            "min_strength": MIN_STRENGTH, "max_strength": MAX_STRENGTH, "n_strengths": N_STRENGTHS,
            "lightgbm": {k: v for k, v in LGBM_PARAMS.items() if k != "verbose"},
        },
        predictor=model,
    )


def _pairs(runs: Sequence[Run], names: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    return np.array([[r.mixture[c] for c in names] for r in runs]), np.array([r.score for r in runs])


# ----------------------------------------------------------------------------------------------------- report
def spearman(a: Sequence[float], b: Sequence[float]) -> float | None:
    """Spearman rank correlation (ties get average ranks); None when either side is constant or n < 2."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.size != b.size:
        raise ValueError(f"spearman: {a.size} vs {b.size} values")
    if a.size < 2 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return None
    return float(np.corrcoef(_ranks(a), _ranks(b))[0, 1])


def _ranks(x: np.ndarray) -> np.ndarray:
    order = np.argsort(x, kind="stable")
    ranks = np.empty(x.size)
    ranks[order] = np.arange(x.size, dtype=np.float64)
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    sums = np.bincount(inverse, weights=ranks)
    return sums[inverse] / counts[inverse]


def fit_quality(model, X: np.ndarray, y: np.ndarray, seed: int) -> dict[str, Any]:
    """How well the predictor fits: in-sample R^2 and Spearman, and Spearman on its early-stopping fold.

    The fold chose the number of trees, so its Spearman is mildly optimistic; the rounds' "predicted vs
    observed" Spearman in the report is the honest out-of-sample check.
    """
    fitted = _predict(model, X)
    sst = float(((y - y.mean()) ** 2).sum())
    split = holdout_split(len(y), seed)
    return {
        "n_points": len(y),
        "n_trees": int(model.best_iteration_ or model.n_estimators) if split else int(model.n_estimators),
        "early_stopping": "holdout" if split else f"none: {FALLBACK_TREES} trees on all points",
        "n_holdout": 0 if split is None else int(split[1].size),
        "r2_in_sample": None if sst == 0 else 1 - float(((y - fitted) ** 2).sum()) / sst,
        "spearman_in_sample": spearman(fitted, y),
        "spearman_holdout": None if split is None else spearman(fitted[split[1]], y[split[1]]),
    }


def plot_search(result: SearchResult, path: str | Path) -> Path:
    """PNG: every run's score in call order, coloured by round, with the best so far; the chosen weights next to
    the prior. (The predicted score of the chosen mixture is left out: a shrunk tree model's predictions are
    on a narrower scale than the scores, so on this axis it would mislead.)"""
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4), layout="constrained")
    FigureCanvasAgg(fig)
    ax_runs, ax_w = fig.subplots(1, 2, width_ratios=[3, 2])
    colors = colormaps["tab10"]
    for i in range(1, len(result.budgets) + 1):
        xs = [j + 1 for j, r in enumerate(result.runs) if r.round == i]
        ax_runs.scatter(xs, [result.runs[x - 1].score for x in xs], color=colors(i - 1), s=18, label=f"round {i}")
    scores = [r.score for r in result.runs]
    ax_runs.step(range(1, len(scores) + 1), np.maximum.accumulate(scores), where="post", color="black", lw=1,
                 label="best so far")
    ax_runs.set(xlabel="objective call", ylabel="score (higher = better)", title="CLIMB search")
    ax_runs.legend(fontsize=8)
    x = np.arange(len(result.names))
    ax_w.bar(x - 0.2, [result.prior[c] for c in result.names], 0.4, color="lightgray", label="prior")
    ax_w.bar(x + 0.2, [result.chosen[c] for c in result.names], 0.4, color=colors(0), label="chosen")
    ax_w.set_xticks(x, result.names, rotation=60, ha="right", fontsize=8)
    ax_w.set(ylabel="weight", title="mixture")
    ax_w.legend(fontsize=8)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path
