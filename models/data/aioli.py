"""Aioli: online data mixing over groups (domains) from a learned linear mixing law.

Chen et al., "Aioli: A Unified Optimization Framework for Language Model Data Mixing" (2024); reference code
HazyResearch/aioli, trainer/aioli_trainer.py (commit a2361123). This file is only the controller: it says which
mixture every training step samples from and when per-group validation losses must be measured, and it turns
those losses into the next mixture. It trains nothing and imports no torch, so a training loop (the Lightning
SFT loop over domains) drives it:

    schedule = AioliSchedule(config, total_steps)
    while not schedule.done:
        if schedule.needs_eval():
            schedule.record_losses({g: val_loss(model, g) for g in config.groups})
            continue
        mixture = schedule.next_mixture()        # {group: probability} for this one step
        train_step(sample_batch(mixture))         # phase "learn_params": exact counts, see batch_counts()

The algorithm (notation of the reference: k groups, `weights` = the mixture p, `graph` = the matrix A):

- Mixing law: training on mixture p lowers group i's validation loss by (A p)_i, A[i, j] = how much training on
  group j helps group i.
- A run is `prior_steps` steps on the static `prior` mixture, then rounds of `update_steps` steps. Each round:
  measure the per-group losses; LearnParams = `lp_rounds` sweeps over the groups in a seeded random order, each
  block `lp_steps` steps on a smoothed one-hot mixture of the block's group, the losses measured after every
  block; estimate A from the loss drops; update p <- p * exp(eta * sum_i A[i, :]); train the rest of the round on
  p.
- Estimating A: drops are averaged over sweeps, the smoothing is un-mixed by solving against the matrix of
  smoothed one-hots, and A is normalised (min shifted to 0 if negative, divided by its total).

What follows the reference where the paper's description is silent (function / variable names of
trainer/aioli_trainer.py):

- `learn_params_subroutine`: `mixture_order` = concatenation of `lp_rounds` independent permutations of the k
  groups; `new_graph[:, onehot_idx] += previous_loss - new_loss` with `previous_loss` chained block to block
  (starting from `loss_0`, measured at the start of each round in `train`); `new_graph /= lp_rounds`; the
  smoothed one-hot is `(1 - one_hot_factor) / (k - 1)` off the group, `one_hot_factor` on it; un-mixing
  `A[i] = np.linalg.solve(weight_matrix, new_graph[i])` with `weight_matrix` rows = the smoothed one-hots, only
  when `one_hot_factor != 1`; the `aioli_diagonal` variant keeps `A[i, i] = new_graph[i, i] / one_hot_factor`.
- `train`: `aioli_normalize_A` (`graph -= min_entry` only if `min_entry < 0`, then `graph /= graph.sum()`); the
  update `weights = weights * exp(eta * graph.sum(axis=0))`, starting from `weights_init` = ones in round 0;
  the `ema` variant `ema_graph = (1 - ema) * graph + ema * ema_graph` (`ema_graph = graph` in round 0) and
  `weights = weights_init * exp(eta * ema_graph.sum(axis=0))`, i.e. NOT multiplied onto the previous weights;
  `aioli_prior` is trained for `prior_steps` steps and then dropped (`weights_init` is reset to ones: the
  dynamic rounds start from uniform, whatever the prior); `lp_duration = lp_rounds * lp_steps * k` of a round's
  `update_steps` go to LearnParams, the rest (until `counter % update_steps == 0`) to the learned mixture.
- dataset/slimpj_dataset.py `interleave_per_batch_mapped` (used for LearnParams blocks, `mapped_train`): a
  LearnParams batch holds a fixed number of examples per group, see `batch_counts`.

Deviations, each for a stated reason: the group order comes from this schedule's own seeded numpy Generator
(the reference draws from the global `np.random` seeded by `set_seed(selection_seed)`); the weights are
renormalised every round (the reference leaves that to `set_proportions`: the same distribution); the
exponent is shifted by its max before `exp` (same distribution, no overflow); a normalised A whose entries are
all zero (sum 0: the reference would divide by zero) stays all zero, which leaves p unchanged; rounds count from
the end of the prior, so only `total_steps - prior_steps` must be a multiple of `update_steps` (the reference
also asserts `total_steps % update_steps == 0` in trainer/utils.py `get_steps` because it counts from step 0).
Not ported: the Skill-It initialisation (`graph_path`, `skillit_subroutine`) and checkpoint/`break_steps`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import Field, model_validator

from branchmerge.models.settings import Settings

PHASES = ("prior", "learn_params", "train")  # AioliSchedule.phase; keys of AioliSchedule.counts with "evals"


# ------------------------------------------------------------------------------------------------------ config
class AioliConfig(Settings):
    """Aioli's knobs. Every field is required (the project keeps defaults in conf/); recommended values from the
    paper's notes in each description."""

    groups: tuple[str, ...] = Field(min_length=2)
    """Group (domain) names, in the order of every vector and matrix here; at least two (the smoothing divides
    by k - 1)."""
    eta: float = Field(gt=0)
    """Step size of the exponentiated update p <- p * exp(eta * sum_i A[i, :]); recommended 0.1, 0.2 or 0.5."""
    lp_rounds: int = Field(ge=1)
    """LearnParams sweeps over all groups per round (reference: `lp_rounds`); recommended 4-6."""
    lp_steps: int = Field(ge=1)
    """Training steps per LearnParams block, i.e. per group per sweep (reference: `lp_steps`); recommended 4."""
    one_hot_factor: float
    """Weight of the block's own group in a LearnParams mixture, the rest spread evenly over the other groups;
    in (1/k, 1], 1 = plain one-hot (no un-mixing); recommended ~0.625."""
    update_steps: int = Field(ge=1)
    """Training steps per round (LearnParams blocks included), i.e. how often p is updated."""
    ema: float | None = Field(ge=0, lt=1)
    """None: multiplicative update of p. A factor in [0, 1): the reference's EMA variant, p = softmax of
    eta * column sums of an exponential moving average of the A's (the previous A's weight is `ema`)."""
    prior: dict[str, float] | None
    """Static mixture trained for `prior_steps` steps before the first round (unnormalised weights, every group
    named); None: no prior phase. As in the reference, the rounds then start from uniform, not from the prior."""
    prior_steps: int = Field(ge=0)
    """Steps on `prior` before the first round (0 without a prior)."""
    normalize_A: bool
    """Shift A's minimum to 0 (if negative) and divide by its total before the update (reference:
    `aioli_normalize_A`, set in all its Aioli scripts); the paper's recommended setting is true."""
    diagonal: bool
    """Ablation (reference: `aioli_diagonal`): keep only A[i, i] = measured drop / one_hot_factor; needs
    one_hot_factor < 1."""
    seed: int
    """Seed of the LearnParams group order (one random permutation per sweep)."""

    @model_validator(mode="after")
    def _check(self) -> AioliConfig:
        k = len(self.groups)
        if len(set(self.groups)) != k or not all(isinstance(g, str) and g for g in self.groups):
            raise ValueError(f"groups must be distinct non-empty names, got {list(self.groups)}")
        if not 1 / k < self.one_hot_factor <= 1:
            raise ValueError(f"one_hot_factor must be in (1/k, 1] = ({1 / k:.4g}, 1] for k={k} groups, "
                             f"got {self.one_hot_factor}")
        if self.diagonal and self.one_hot_factor == 1:
            raise ValueError("diagonal needs one_hot_factor < 1 (the reference ignores it at one_hot_factor == 1)")
        if self.prior is not None:
            unknown = sorted(set(self.prior) - set(self.groups))
            missing = [g for g in self.groups if g not in self.prior]
            if unknown or missing:
                raise ValueError(f"prior: unknown groups {unknown}, missing groups {missing}")
            values = [self.prior[g] for g in self.groups]
            if not all(math.isfinite(v) and v >= 0 for v in values) or sum(values) <= 0:
                raise ValueError(f"prior must be finite weights >= 0 with a positive sum, got {self.prior}")
        elif self.prior_steps > 0:
            raise ValueError(f"prior_steps={self.prior_steps} needs a prior mixture (prior is None)")
        return self


# ---------------------------------------------------------------------------------------------- pure formulas
def smoothed_one_hot(k: int, j: int, one_hot_factor: float) -> np.ndarray:
    """LearnParams mixture of group j: one_hot_factor on j, (1 - one_hot_factor) / (k - 1) on every other group
    (reference `learn_params_subroutine`: `weights`)."""
    if k < 2:
        raise ValueError(f"k must be >= 2 groups, got {k}")
    if not 0 <= j < k:
        raise ValueError(f"j must be a group index in [0, {k}), got {j}")
    if not 1 / k < one_hot_factor <= 1:
        raise ValueError(f"one_hot_factor must be in (1/k, 1] for k={k}, got {one_hot_factor}")
    row = np.full(k, (1 - one_hot_factor) / (k - 1))
    row[j] = one_hot_factor
    return row


def smoothing_matrix(k: int, one_hot_factor: float) -> np.ndarray:
    """W[j] = smoothed_one_hot(k, j): the mixtures LearnParams trains on (reference: `weight_matrix`). It is
    invertible exactly when one_hot_factor != 1/k (eigenvalues 1 and (k f - 1) / (k - 1))."""
    return np.stack([smoothed_one_hot(k, j, one_hot_factor) for j in range(k)])


def normalize_A(A: np.ndarray) -> np.ndarray:
    """Reference `aioli_normalize_A`: shift so the minimum is 0 (only if it is negative), divide by the total.

    All entries equal to zero after the shift (no information; the reference would divide by zero): all zeros,
    which leaves p unchanged in the multiplicative update."""
    A = np.array(A, dtype=float)
    lowest = A.min()
    if lowest < 0:
        A -= lowest
    total = A.sum()
    return A / total if total > 0 else np.zeros_like(A)


def estimate_A(drops: np.ndarray, one_hot_factor: float, *, normalize: bool, diagonal: bool = False) -> np.ndarray:
    """The mixing-law matrix A[i, j] (group i measured, group j trained) from LearnParams' loss drops.

    drops: [lp_rounds, k, k], drops[r, j, i] = loss of group i before minus after the block of sweep r that
    trained on group j's smoothed one-hot. With the linear law, the mean over sweeps G[i, j] = (A W[j])_i, i.e.
    G = A W^T; the reference solves it row by row, A[i] = solve(W, G[i]) (W is symmetric). one_hot_factor == 1:
    W = I, nothing to un-mix. diagonal: A = diag(G[i, i] / one_hot_factor) instead. normalize: then normalize_A.
    """
    drops = np.asarray(drops, dtype=float)
    if drops.ndim != 3 or drops.shape[1] != drops.shape[2] or drops.shape[0] < 1:
        raise ValueError(f"drops must have shape [lp_rounds, k, k], got {drops.shape}")
    k = drops.shape[1]
    graph = drops.sum(axis=0).T / drops.shape[0]  # reference: new_graph[:, onehot_idx] += ...; /= lp_rounds
    if one_hot_factor != 1 and diagonal:
        A = np.diag(np.diag(graph) / one_hot_factor)
    elif one_hot_factor != 1:
        A = np.linalg.solve(smoothing_matrix(k, one_hot_factor), graph.T).T  # all rows at once
    else:
        A = graph
    return normalize_A(A) if normalize else A


def update_proportions(p: np.ndarray, A: np.ndarray, eta: float, ema: float | None,
                       A_ema: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """One Aioli update; returns (new p, normalised to sum 1; the EMA matrix to pass next round, None without EMA).

    ema None: p_new ∝ p * exp(eta * A.sum(axis=0)) (reference: `weights * np.exp(eta * graph.sum(axis=0))`).
    ema given: A_ema_new = A if A_ema is None (first round) else (1 - ema) * A + ema * A_ema, and
    p_new ∝ exp(eta * A_ema_new.sum(axis=0)): the reference multiplies `weights_init` (ones), not p, so p is
    ignored in this variant.
    """
    if eta <= 0:
        raise ValueError(f"eta must be > 0, got {eta}")
    A = np.asarray(A, dtype=float)
    k = A.shape[0]
    if A.shape != (k, k):
        raise ValueError(f"A must be square, got shape {A.shape}")
    p = np.asarray(p, dtype=float)
    if p.shape != (k,) or (p < 0).any() or not p.sum() > 0:
        raise ValueError(f"p must be {k} weights >= 0 with a positive sum, got {p}")
    if ema is not None:
        if not 0 <= ema < 1:
            raise ValueError(f"ema must be in [0, 1), got {ema}")
        A_ema = A if A_ema is None else (1 - ema) * A + ema * np.asarray(A_ema, dtype=float)
        base, gain = np.ones(k), eta * A_ema.sum(axis=0)
    else:
        A_ema = None
        base, gain = p, eta * A.sum(axis=0)
    weights = base * np.exp(gain - gain.max())  # the shift cancels in the normalisation
    return weights / weights.sum(), A_ema


def batch_counts(p: Sequence[float] | np.ndarray, batch_size: int) -> np.ndarray:
    """Examples per group in one LearnParams batch, as the reference builds them (dataset/slimpj_dataset.py
    `interleave_per_batch_mapped`): max(1, int(p_i * batch_size)) for all groups but the last, which takes the
    rest (then the batch is shuffled). Normal steps sample from p at random instead (`interleave_datasets`)."""
    counts = np.array([max(1, int(r * batch_size)) for r in p])
    counts[-1] = batch_size - counts[:-1].sum()
    if counts[-1] < 0:
        raise ValueError(f"batch_size={batch_size} is too small for {len(counts)} groups at >= 1 example each")
    return counts


# -------------------------------------------------------------------------------------------------- controller
@dataclass
class AioliRound:
    """One entry of AioliSchedule.history: the mixture in force from `step` on (round 0 = the uniform start,
    no matrices) and the matrices it came from."""

    round: int
    step: int  # training steps taken before this mixture applies
    proportions: dict[str, float]
    A: np.ndarray | None = None  # the matrix used by the update (normalised if normalize_A)
    A_raw: np.ndarray | None = None  # estimate_A before normalisation
    A_ema: np.ndarray | None = None  # the EMA matrix (ema variant only)
    drops: np.ndarray | None = field(default=None, repr=False)  # [lp_rounds, k trained, k measured]

    def metrics(self, prefix: str = "aioli") -> dict[str, float]:
        """Flat floats for MLflow (log at `step`): the proportions and the column sums of A (each group's use)."""
        out = {f"{prefix}.p.{g}": v for g, v in self.proportions.items()}
        if self.A is not None:
            out.update({f"{prefix}.A_colsum.{g}": float(v) for g, v in zip(self.proportions, self.A.sum(axis=0))})
        return out


class AioliSchedule:
    """The step-by-step state machine a training loop drives (module docstring: the loop).

    A run of `total_steps` training steps is: `prior_steps` steps on the prior, then (total_steps - prior_steps)
    / update_steps rounds, each [eval, then lp_rounds * k blocks of (lp_steps steps, eval), update p, then
    update_steps - lp_rounds * k * lp_steps steps on p]. next_mixture() refuses to run while an eval is due.
    """

    def __init__(self, config: AioliConfig, total_steps: int):
        self.config = config
        self.groups = tuple(config.groups)
        k = len(self.groups)
        self.lp_duration = config.lp_rounds * k * config.lp_steps  # reference: lp_duration
        dynamic = total_steps - config.prior_steps
        if dynamic < config.update_steps or dynamic % config.update_steps:
            raise ValueError(f"total_steps - prior_steps = {total_steps} - {config.prior_steps} = {dynamic} must be "
                             f"a positive multiple of update_steps={config.update_steps}")
        if self.lp_duration >= config.update_steps:
            raise ValueError(f"lp_rounds * k * lp_steps = {config.lp_rounds} * {k} * {config.lp_steps} = "
                             f"{self.lp_duration} LearnParams steps must be < update_steps={config.update_steps} "
                             f"(else no step trains on the learned mixture)")
        self.total_steps = total_steps
        self.n_rounds = dynamic // config.update_steps
        self._rng = np.random.default_rng(config.seed)
        self._p = np.full(k, 1 / k)  # reference: weights_init = ones (the prior is not carried over)
        self._A_ema: np.ndarray | None = None
        self._prior = None
        if config.prior is not None:
            prior = np.array([config.prior[g] for g in self.groups], dtype=float)
            self._prior = prior / prior.sum()
        self.step = 0  # training steps handed out so far
        self.round = 0  # rounds started (1-based while running)
        self.counts = {"prior": 0, "learn_params": 0, "train": 0, "evals": 0}
        self.history: list[AioliRound] = []
        self._eval_due = False
        self._left = 0  # steps left in the current block / phase
        self._order = np.zeros(0, dtype=int)  # this round's LearnParams group order
        self._block = 0  # index into _order
        self._drops = np.zeros((config.lp_rounds, k, k))
        self._previous: np.ndarray | None = None  # losses at the last eval of this round
        self.phase = "prior"  # one of PHASES: the phase of the next step (read it before next_mixture())
        if config.prior_steps > 0:
            self._left = config.prior_steps
        else:
            self._start_round()

    # --------------------------------------------------------------------------------------- loop interface
    @property
    def done(self) -> bool:
        return self.step == self.total_steps and not self._eval_due

    @property
    def proportions(self) -> dict[str, float]:
        """The learned mixture p (uniform until the first update)."""
        return dict(zip(self.groups, map(float, self._p)))

    @property
    def current_group(self) -> str | None:
        """The group of the LearnParams block in progress (None outside LearnParams)."""
        return self.groups[self._order[self._block]] if self.phase == "learn_params" else None

    def needs_eval(self) -> bool:
        """True: measure every group's validation loss and pass it to record_losses before the next step."""
        return self._eval_due

    def steps_until_eval(self) -> int:
        """Steps the current mixture stays unchanged (until the next eval or the end): a loop may build one
        dataloader for them, as the reference builds one dataset per block."""
        return 0 if self._eval_due else self._left

    def next_mixture(self) -> dict[str, float]:
        """Take one training step: the mixture {group: probability} its batch must be sampled from."""
        if self._eval_due:
            raise RuntimeError("an eval is due: call record_losses() before the next step")
        if self.step >= self.total_steps:
            raise RuntimeError(f"the schedule is done ({self.total_steps} steps)")
        phase = self.phase
        if phase == "prior":
            mixture = self._prior
        elif phase == "learn_params":
            mixture = smoothed_one_hot(len(self.groups), int(self._order[self._block]), self.config.one_hot_factor)
        else:
            mixture = self._p
        self.step += 1
        self.counts[phase] += 1
        self._left -= 1
        if self._left == 0:
            if phase == "learn_params":
                self._eval_due = True  # the block's loss drop
            elif self.step < self.total_steps:
                self._start_round()  # after the prior or after a round's training on p
        return dict(zip(self.groups, map(float, mixture)))

    def record_losses(self, losses: Mapping[str, float]) -> None:
        """Per-group validation losses (lower is better) measured now, when needs_eval() asked for them."""
        if not self._eval_due:
            raise RuntimeError("no eval is due: record_losses() only when needs_eval() is true")
        unknown = sorted(set(losses) - set(self.groups))
        missing = [g for g in self.groups if g not in losses]
        if unknown or missing:
            raise ValueError(f"losses: unknown groups {unknown}, missing groups {missing}")
        loss = np.array([float(losses[g]) for g in self.groups])
        if not np.isfinite(loss).all():
            raise ValueError(f"losses must be finite, got {dict(losses)}")
        self.counts["evals"] += 1
        self._eval_due = False
        if self._previous is not None:  # after a block (else: the round's loss_0)
            k = len(self.groups)
            j = int(self._order[self._block])
            self._drops[self._block // k, j] = self._previous - loss  # reference: previous_loss - new_loss
            self._block += 1
            if self._block == len(self._order):
                self._update()
                return
        self._previous = loss
        self._left = self.config.lp_steps

    # ------------------------------------------------------------------------------------------- internals
    def _start_round(self) -> None:
        k = len(self.groups)
        self.round += 1
        self.phase = "learn_params"
        # reference: mixture_order = concatenate([permutation(k) for _ in range(lp_rounds)])
        self._order = np.concatenate([self._rng.permutation(k) for _ in range(self.config.lp_rounds)])
        self._block = 0
        self._drops = np.zeros((self.config.lp_rounds, k, k))
        self._previous = None
        self._eval_due = True  # loss_0
        self._left = 0
        if not self.history:
            self.history.append(AioliRound(0, self.step, self.proportions))

    def _update(self) -> None:
        cfg = self.config
        A_raw = estimate_A(self._drops, cfg.one_hot_factor, normalize=False, diagonal=cfg.diagonal)
        A = normalize_A(A_raw) if cfg.normalize_A else A_raw
        self._p, self._A_ema = update_proportions(self._p, A, cfg.eta, cfg.ema, self._A_ema)
        self.history.append(AioliRound(self.round, self.step, self.proportions, A, A_raw,
                                       None if self._A_ema is None else self._A_ema.copy(), self._drops))
        self.phase = "train"
        self._previous = None
        self._left = cfg.update_steps - self.lp_duration


# ------------------------------------------------------------------------------------------------------- plot
def plot_proportions(history: Sequence[AioliRound], path: str | Path, title: str | None = None) -> Path:
    """PNG of each group's proportion per round (round 0 = the uniform start), as stairs: p is constant over a
    round's training steps."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not history:
        raise ValueError("history is empty")
    groups = list(history[0].proportions)
    rounds = [rec.round for rec in history]
    fig = Figure(figsize=(6.0, 3.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for g in groups:
        ax.step(rounds, [rec.proportions[g] for rec in history], where="post", marker="o", markersize=3, label=g)
    ax.set_xlabel("round (update of p)")
    ax.set_ylabel("proportion")
    ax.set_ylim(0, 1)
    ax.set_title(title or "Aioli mixture per round")
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.0, 1.0))
    path = Path(path)
    fig.savefig(path, format="png", dpi=120, bbox_inches="tight")
    return path


def history_records(history: Sequence[AioliRound]) -> list[dict[str, Any]]:
    """history as JSON-ready dicts (matrices as nested lists), e.g. for an MLflow artifact."""
    def plain(x):
        return None if x is None else np.asarray(x).tolist()

    return [{"round": r.round, "step": r.step, "proportions": r.proportions, "A": plain(r.A),
             "A_raw": plain(r.A_raw), "A_ema": plain(r.A_ema), "drops": plain(r.drops)} for r in history]
