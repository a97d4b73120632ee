"""Karn: a blueprint generator that learns, from the store's history, which variants pay.

Every seed the env germinates leaves a `SeedOutcome` in the kernel store (blueprint kind and
hyper-parameters, slot shape, node features at germination, measured contribution, params).
`ContributionPredictor` is a ridge regression (numpy) from those to the measured contribution.
On a GERMINATE of a kind, `KarnGenerator.propose` builds the kind's variants that fit the
budget (sizes across the fitting range, and where the template has them every activation and a
few init scales), predicts each one's contribution for this node now, and proposes the best
by `objective`:

* "per_param" (default): the best predicted contribution per parameter, among variants
  predicted to help (if none is, the least harmful one);
* "reward": the best predicted reward, `accuracy * contribution - param_cost * log2(1 + params
  / host params) * (1 - progress)`, with the default RewardWeights prices (the rent is paid for
  the rest of the episode).

With probability `explore` (and while the history holds fewer than `min_history` outcomes) it
proposes a variant uniformly at random instead; the draw comes from the env's RNG
(`ProposalContext.rng`), so an episode is reproducible for a given store history. Without a
context (called outside an env) it proposes what the template generator would.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import warnings
from collections.abc import Mapping, Sequence

import numpy as np

from esper_gym.kernels.blueprints import ACTIVATIONS, BLUEPRINTS, Blueprint
from esper_gym.kernels.generator import BlueprintGenerator, ProposalContext
from esper_gym.kernels.store import SeedOutcome
from esper_gym.reward import RewardWeights

OBJECTIVES = ("per_param", "reward")
INIT_SCALES = (0.5, 1.0, 2.0)
SIZE_POINTS = (0.125, 0.25, 0.5, 1.0)  # fractions of the fitting size range Karn tries
KINDS = tuple(name for name, cls in BLUEPRINTS.items() if not cls.is_fault)
NODE_KEYS = ("dead_ratio", "act_mean", "act_var", "grad_norm", "weight_norm", "progress", "val_acc")


def feature_vector(
    blueprint: Mapping, shape: Sequence[int], node: Mapping[str, float], params: int, host: int
) -> np.ndarray:
    """The predictor's inputs for one seed: kind (one-hot), size (log params, log ratio to the
    host), activation (one-hot), log2 init scale, slot shape, and the node's health and the
    episode's progress at germination. Missing node features count as 0."""
    kind = blueprint.get("name", "")
    activation = blueprint.get("activation", "")
    log_ratio = math.log2(1.0 + params / max(host, 1))
    progress = float(node.get("progress", 0.0))
    row = [
        *(float(kind == k) for k in KINDS),
        math.log2(1.0 + params) / 10.0,
        log_ratio,
        log_ratio * (1.0 - progress),  # capacity times the time left to use it
        *(float(activation == a) for a in ACTIVATIONS),
        math.log2(float(blueprint.get("init_scale", 1.0))),
        float(len(shape) == 3),
        math.log2(shape[0]) / 10.0,
        float(node.get("dead_ratio", 0.0)),
        math.tanh(float(node.get("act_mean", 0.0))),
        math.log1p(max(float(node.get("act_var", 0.0)), 0.0)),
        math.log1p(max(float(node.get("grad_norm", 0.0)), 0.0)),
        math.log1p(max(float(node.get("weight_norm", 0.0)), 0.0)),
        progress,
        float(node.get("val_acc", 0.0)),
    ]
    return np.asarray(row, dtype=np.float64)


def outcome_features(outcome: SeedOutcome) -> np.ndarray:
    return feature_vector(
        outcome.blueprint, outcome.shape, outcome.features, outcome.params, outcome.host_params
    )


ALPHAS = tuple(10.0**k for k in range(-2, 6))  # the penalties "auto" chooses from


@dataclasses.dataclass
class ContributionPredictor:
    """Ridge regression on standardised features (the intercept is not penalised). `alpha`:
    the penalty, or None to choose it from ALPHAS by leave-one-out error (closed form), so a
    history whose features do not predict its contributions shrinks to their mean instead of
    fitting its noise."""

    alpha: float | None = None
    chosen_alpha: float | None = None  # the penalty the last fit used
    coef: np.ndarray | None = None
    intercept: float = 0.0
    mean: np.ndarray | None = None
    scale: np.ndarray | None = None

    def fit(self, x: np.ndarray, y: np.ndarray) -> ContributionPredictor:
        x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
        if x.ndim != 2 or len(x) != len(y) or len(y) == 0:
            raise ValueError(
                f"fit needs rows x features and one target per row: {x.shape}, {y.shape}"
            )
        self.mean = x.mean(axis=0)
        std = x.std(axis=0)
        self.scale = np.where(std > 1e-12, std, 1.0)  # a constant column stays 0 after centring
        z = (x - self.mean) / self.scale
        self.intercept = float(y.mean())
        # Via the SVD z = U diag(s) V': coefficients and the hat matrix's diagonal for any
        # alpha at the cost of one decomposition.
        u, sv, vt = np.linalg.svd(z, full_matrices=False)
        uty = u.T @ (y - self.intercept)
        alpha = self.alpha if self.alpha is not None else self._loo_alpha(u, sv, uty, y)
        self.chosen_alpha = alpha
        self.coef = vt.T @ (sv / (sv**2 + alpha) * uty)
        return self

    def _loo_alpha(self, u, sv, uty, y) -> float:
        n, best, best_err = len(y), ALPHAS[-1], math.inf
        for alpha in ALPHAS:
            shrink = sv**2 / (sv**2 + alpha)
            fitted = u @ (shrink * uty) + self.intercept
            hat = (u**2) @ shrink + 1.0 / n  # + the intercept's share
            residual = (y - fitted) / np.maximum(1.0 - hat, 1e-9)
            err = float(np.mean(residual**2))
            if err < best_err:
                best, best_err = alpha, err
        return best

    def predict(self, x: np.ndarray) -> np.ndarray:
        if self.coef is None:
            raise RuntimeError("predict before fit")
        z = (np.asarray(x, np.float64) - self.mean) / self.scale
        return z @ self.coef + self.intercept


def fit_outcomes(
    outcomes: Sequence[SeedOutcome], alpha: float | None = None
) -> ContributionPredictor:
    x = np.stack([outcome_features(o) for o in outcomes])
    y = np.asarray([o.contribution for o in outcomes])
    return ContributionPredictor(alpha).fit(x, y)


class KarnGenerator(BlueprintGenerator):
    """The template generator's `fits`, with `propose` choosing a variant the history says pays
    (module docstring). `explore`: fraction of proposals drawn at random; `min_history`:
    outcomes needed before the predictor is trusted; `history`: newest outcomes fitted on;
    `alpha`: ridge penalty (None: chosen by leave-one-out error)."""

    def __init__(
        self,
        library: Sequence[str] | None = None,
        explore: float = 0.1,
        min_history: int = 16,
        history: int = 5000,
        alpha: float | None = None,
        objective: str = "per_param",
    ) -> None:
        super().__init__(library)
        if (
            isinstance(explore, bool)
            or not isinstance(explore, (int, float))
            or not 0 <= explore <= 1
        ):
            raise ValueError(f"karn explore={explore!r} must be a fraction in [0, 1]")
        for name, value in (("min_history", min_history), ("history", history)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"karn {name}={value!r} must be an integer >= 1")
        if alpha is not None and (
            isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha > 0
        ):
            raise ValueError(f"karn alpha={alpha!r} must be a number > 0 or None (chosen by CV)")
        if objective not in OBJECTIVES:
            raise ValueError(f"karn objective={objective!r}; allowed: {', '.join(OBJECTIVES)}")
        self.explore, self.min_history, self.history = float(explore), min_history, history
        self.alpha = None if alpha is None else float(alpha)
        self.objective = objective
        self.prices = RewardWeights()
        self.last_choice = ""  # "template", "explore" or "predicted": for reports and tests
        self._warned_skipped = 0

    def variants(
        self, shape: Sequence[int], kind: str, param_budget: int | None
    ) -> list[Blueprint]:
        """Every variant of `kind` Karn may propose for `shape` within the budget."""
        shape = tuple(int(s) for s in shape)
        prototype = self._prototype(shape, kind)
        sizes: Sequence = [None]
        if prototype.size_field is not None:
            fitting = self.fitting_sizes(shape, prototype, param_budget)
            n = len(fitting)
            sizes = sorted({fitting[round(f * (n - 1))] for f in SIZE_POINTS}) if n else []
        names = [f.name for f in dataclasses.fields(prototype)]
        activations = tuple(ACTIVATIONS) if "activation" in names else (None,)
        scales = INIT_SCALES if "init_scale" in names else (None,)
        out = []
        for size, activation, scale in itertools.product(sizes, activations, scales):
            changes = {}
            if size is not None:
                changes[prototype.size_field] = size
            if activation is not None:
                changes["activation"] = activation
            if scale is not None:
                changes["init_scale"] = scale
            blueprint = dataclasses.replace(prototype, **changes)
            if param_budget is None or blueprint.param_count(shape) <= param_budget:
                out.append(blueprint)
        return out

    def propose(
        self,
        shape: Sequence[int],
        kind: str,
        param_budget: int | None = None,
        context: ProposalContext | None = None,
    ) -> Blueprint:
        shape = tuple(int(s) for s in shape)
        if context is None or context.store is None or context.rng is None:
            self.last_choice = "template"
            return super().propose(shape, kind, param_budget)
        candidates = self.variants(shape, kind, param_budget)
        if not candidates:
            return super().propose(shape, kind, param_budget)  # raises with the reason
        rng = context.rng
        explore = float(rng.random()) < self.explore
        history = context.store.outcomes(limit=self.history)
        if history.skipped and history.skipped != self._warned_skipped:
            # A bad row is evidence of nothing: growth goes on from the readable ones, and the
            # user is told once per count, not every germination.
            self._warned_skipped = history.skipped
            warnings.warn(
                f"kernel store {context.store!r}: skipped {history.skipped} malformed outcome "
                f"row(s) of the last {self.history}; first: {history.problems[0]}",
                stacklevel=2,
            )
        if explore or len(history) < self.min_history:
            self.last_choice = "explore"
            return candidates[int(rng.integers(len(candidates)))]
        scores = self.scores(candidates, shape, context, fit_outcomes(history, self.alpha))
        self.last_choice = "predicted"
        return candidates[int(np.argmax(scores))]

    def scores(
        self,
        candidates: Sequence[Blueprint],
        shape: tuple[int, ...],
        context: ProposalContext,
        predictor: ContributionPredictor,
    ) -> np.ndarray:
        """The objective of each candidate (higher is better)."""
        host = context.host_params
        params = np.asarray([c.param_count(shape) for c in candidates], np.float64)
        x = np.stack(
            [
                feature_vector(c.to_dict(), shape, context.features, int(p), host)
                for c, p in zip(candidates, params)
            ]
        )
        pred = predictor.predict(x)
        if self.objective == "reward":
            left = 1.0 - float(context.features.get("progress", 0.0))
            rent = self.prices.param_cost * np.log2(1.0 + params / max(host, 1)) * left
            return self.prices.accuracy * pred - rent
        if (pred > 0).any():
            return np.where(pred > 0, pred / np.maximum(params, 1.0), -np.inf)
        return pred  # nothing is predicted to help: the least harmful
