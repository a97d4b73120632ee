"""Growth rules as agents: the published `north`, `fragrow` and `gradmax`, and `reactive`.

Each is the *when* and *where* of a published method, adapted to the seed action space (WAIT,
GERMINATE a blueprint in a slot of a layer, ADVANCE, CULL, under the action mask). The *how*
(what the new capacity is) is always a blueprint from the task's library, the first of
`preference` that the mask allows, since a seed's kernel is built from a template, not from the
method's initialisation. Like every agent they see only the observation; every seed they
germinate is advanced as soon as the mask allows (like `schedule`), and none of them ever culls:
the three methods only add capacity.

Their thresholds are tuned per task on train contexts and train seeds by
experiments/tune_rules.py and stored in conf/rule_params.yaml; `make_agent(name, env)` with
`params=None` plays the task's tuned values.
"""

from __future__ import annotations

import inspect
import math
import numbers
from collections.abc import Mapping

import numpy as np
from gymnasium import spaces

from esper_gym.actions import ADVANCE, GERMINATE, Action
from esper_gym.kasmina.lifecycle import GROWING, UNBLENDED
from esper_gym.observation import ObsView, layout_from_spaces

PARAMS_FILE = "rule_params.yaml"  # in esper_gym.config_dir(): experiments/tune_rules.py
PREFERENCE = ("residual_mlp", "conv3x3", "bottleneck", "low_rank")


def _fraction(name: str, value, low_open: bool = True) -> float:
    """`value` as a float in (0, 1] (or [0, 1) with low_open=False), else a clear error."""
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (0 < value <= 1 if low_open else 0 <= value < 1)
    if not ok:
        allowed = "(0, 1]" if low_open else "[0, 1)"
        raise ValueError(f"{name}={value!r} must be a number in {allowed}")
    return float(value)


def _count(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name}={value!r} must be an integer >= 1")
    return int(value)


class GrowthRule:
    """What the rules share: decoding the observation, the blueprint preference, advancing
    seeds, and remembering the episode's germinations (reset when progress restarts at 0).

    Subclasses implement `grow(obs, progress, n_nodes)`: a GERMINATE action the mask allows, or
    None. Each step: that germination if there is one, else ADVANCE the first live seed the mask
    allows (layer order), else WAIT. `hidden_only`: grow only in hidden layers (every layer but
    the last, the output layer, whose width is the class count rather than capacity), as the
    three methods do; a one-layer host grows in its only layer.
    """

    def __init__(
        self,
        observation_space: spaces.Dict,
        action_space: spaces.Discrete,
        blueprints: tuple[str, ...] | None = None,
        preference: tuple[str, ...] = PREFERENCE,
        hidden_only: bool = True,
    ) -> None:
        from esper_gym.kernels.blueprints import DEFAULT_LIBRARY

        self.layout = layout_from_spaces(observation_space, action_space)
        self.blueprints = tuple(blueprints or DEFAULT_LIBRARY)[: self.layout.blueprints]
        order = [self.blueprints.index(p) for p in preference if p in self.blueprints]
        self.order = order + [b for b in range(len(self.blueprints)) if b not in order]
        if not isinstance(hidden_only, bool):
            raise ValueError(f"hidden_only={hidden_only!r} must be true or false")
        self.hidden_only = hidden_only
        self.reset()

    def reset(self) -> None:
        self.grown = 0  # germinations this episode
        self.last_growth = 0.0  # training progress at the last one (0 before any)

    def grow(self, obs: Mapping[str, np.ndarray], progress: float, n_nodes: int) -> int | None:
        """The rule itself, defined by each rule class (north, fragrow, gradmax): the
        GERMINATE action to take now, or None to wait."""
        raise TypeError(f"{type(self).__name__} is the rules' base class; use one of {list(RULES)}")

    def act(self, obs: Mapping[str, np.ndarray], info: dict | None = None) -> int:
        view = ObsView(obs)
        progress = float(view.glob("progress"))
        if progress == 0 and self.grown:  # a new episode: progress restarts at 0
            self.reset()
        n_nodes = view.n_nodes
        action = self.grow(obs, progress, n_nodes)
        if action is not None:
            self.grown += 1
            self.last_growth = progress
            return action
        return self.advance(obs, n_nodes)

    # ------------------------------------------------------------------ helpers
    def layers(self, n_nodes: int) -> range:
        """The layers growth may use, in data-flow order."""
        return range(n_nodes - 1) if self.hidden_only and n_nodes > 1 else range(n_nodes)

    def germination(self, obs: Mapping[str, np.ndarray], layer: int) -> int | None:
        """GERMINATE in the first slot of `layer` the mask allows, with the first blueprint of
        the preference it allows there; None when the layer has no such slot."""
        mask, lay = obs["action_mask"], self.layout
        for s in range(lay.slots):
            for b in self.order:
                a = lay.encode(Action(GERMINATE, layer, s, b))
                if mask[a]:
                    return a
        return None

    def in_progress(self, obs: Mapping[str, np.ndarray], n_nodes: int) -> bool:
        """Some seed has not reached alpha 1 yet (UNBLENDED: GERMINATED, TRAINING or BLENDING)."""
        view = ObsView(obs)
        return any(
            view.state(n, s) in UNBLENDED for n in range(n_nodes) for s in range(self.layout.slots)
        )

    def advance(self, obs: Mapping[str, np.ndarray], n_nodes: int) -> int:
        """ADVANCE the first growing seed the mask allows (layer order), else WAIT."""
        view, mask, lay = ObsView(obs), obs["action_mask"], self.layout
        for n in range(n_nodes):
            for s in range(lay.slots):
                a = lay.encode(Action(ADVANCE, n, s))
                if view.state(n, s) in GROWING and mask[a]:
                    return a
        return 0


class NorthAgent(GrowthRule):
    """NORTH*-style trigger: grow where a layer's activations use most of its width.

    Source: Maile, Rachelson, Luga & Wilson, "When, where, and how to add new neurons to ANNs"
    (AutoML-Conf 2022). NORTH* triggers growth in a layer when the effective dimension of its
    activations, relative to its width, exceeds a threshold: the layer already uses nearly every
    direction it has, so new neurons can add new ones.

    Adapted: the observation's `eff_rank` (exp of the entropy of the normalised singular values
    of the layer's output on one recorded batch per step, divided by the width; the smooth form
    of counting singular values above a tolerance) is the trigger. Each step, among the layers
    growth may use (`hidden_only`) that have a slot the mask allows, those with
    eff_rank >= `threshold` are saturated, and the most saturated one (earlier on ties) gets a
    seed. New neurons lower a layer's ratio in NORTH* (the width grows), which stops the trigger
    from firing again at once; a seed adds no units to the width, so instead no seed starts
    while another is still GERMINATED, TRAINING or BLENDING, nor after training progress `late`
    (NORTH* stops growing once the network has converged to its size). A layer grows at most
    once per slot: seeds are never culled.
    """

    def __init__(
        self,
        observation_space: spaces.Dict,
        action_space: spaces.Discrete,
        blueprints: tuple[str, ...] | None = None,
        threshold: float = 0.3,
        late: float = 0.7,
        preference: tuple[str, ...] = PREFERENCE,
        hidden_only: bool = True,
    ) -> None:
        self.threshold = _fraction("threshold", threshold)
        self.late = _fraction("late", late)
        super().__init__(observation_space, action_space, blueprints, preference, hidden_only)

    def grow(self, obs, progress, n_nodes):
        if progress >= self.late or self.in_progress(obs, n_nodes):
            return None
        rank = ObsView(obs).node("eff_rank")
        saturated = [n for n in self.layers(n_nodes) if rank[n] >= self.threshold]
        for n in sorted(saturated, key=lambda n: (-float(rank[n]), n)):
            action = self.germination(obs, n)
            if action is not None:
                return action
        return None


class FragrowAgent(GrowthRule):
    """FRAGrow-style interval: grow sooner when the model underfits, later when it overfits.

    Source: Wu, Wang, Malepathirana, Senanayake, Oetomo & Halgamuge, "When To Grow? A Fitting
    Risk-Aware Policy for Layer Growing in Deep Neural Networks" (AAAI 2024). FRAGrow sets the
    interval between growths from an overfitting-risk level (ORL) read from the gap between
    training and validation accuracy, I = I_max / (1 + exp(alpha - ORL)) with
    I_max = (E_total - E_finetune_min) / n for n growths: a small gap (underfitting) gives a
    short interval, a large one a long interval (growing late keeps the new blocks
    under-trained, which regularises). New blocks go front to back, filling a stage before the
    next.

    Adapted: time is training progress (0..1) instead of epochs, with the growth phase ending
    at progress `late` (1 - late is the minimum fine-tuning share), so
    I_max = late / `growths`. ORL is the gap itself in accuracy points,
    100 * (train_acc - val_acc) from the observation (train_acc: the running accuracy over the
    last interval's training batches), read at each step: the next seed is germinated once
    progress - (progress at the last germination, 0 before the first) >= I. `alpha` shifts the
    sigmoid: at a zero gap I = I_max / (1 + e^alpha). A negative gap (noisy training labels make
    train accuracy the lower) shortens the interval, which is the rule's reading of
    underfitting. At most `growths` seeds, none after `late`. Where: front to back, the first
    layer growth may use (`hidden_only`) with a slot the mask allows, so a layer's slots fill
    before the next layer's.
    """

    def __init__(
        self,
        observation_space: spaces.Dict,
        action_space: spaces.Discrete,
        blueprints: tuple[str, ...] | None = None,
        growths: int = 3,
        alpha: float = 0.0,
        late: float = 0.7,
        preference: tuple[str, ...] = PREFERENCE,
        hidden_only: bool = True,
    ) -> None:
        self.growths = _count("growths", growths)
        if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or not -50 <= alpha <= 50:
            raise ValueError(f"alpha={alpha!r} must be a number in [-50, 50]")
        self.alpha = float(alpha)
        self.late = _fraction("late", late)
        super().__init__(observation_space, action_space, blueprints, preference, hidden_only)

    def interval(self, obs: Mapping[str, np.ndarray]) -> float:
        """The growth interval (a progress fraction) the current accuracy gap sets."""
        view = ObsView(obs)
        orl = 100.0 * (float(view.glob("train_acc")) - float(view.glob("val_acc")))
        return (self.late / self.growths) / (1.0 + math.exp(min(self.alpha - orl, 50.0)))

    def grow(self, obs, progress, n_nodes):
        if self.grown >= self.growths or progress >= self.late:
            return None
        if progress - self.last_growth < self.interval(obs):
            return None
        for n in self.layers(n_nodes):
            action = self.germination(obs, n)
            if action is not None:
                return action
        return None


class GradmaxAgent(GrowthRule):
    """GradMax-style growth: a fixed interval, in the layer with the largest gradient mass.

    Source: Evci, van Merriënboer, Unterthiner, Vladymyrov & Pedregosa, "GradMax: Growing
    Neural Networks using Gradient Information" (ICLR 2022). GradMax grows a network at a fixed
    interval of training steps until it reaches its target size, and initialises each new
    neuron so that the gradient norm its new weights receive, built from the gradient at the
    layer's output, is as large as possible: where that gradient is largest, new capacity
    reduces the loss fastest.

    Adapted: a seed's initialisation is its blueprint's, so the gradient criterion picks *where*
    instead of *how*: the k-th seed (k = 0 .. `growths` - 1) is germinated at training progress
    `start` + k * `interval`, in the layer growth may use (`hidden_only`), with a slot the mask
    allows, whose `log_out_grad` (log1p of the RMS per-sample norm of the loss gradient with
    respect to the layer's output, on the step's recorded batch) is the largest (earlier on
    ties). A due seed that no layer can take waits until one can (a freed slot).
    """

    def __init__(
        self,
        observation_space: spaces.Dict,
        action_space: spaces.Discrete,
        blueprints: tuple[str, ...] | None = None,
        interval: float = 0.1,
        start: float = 0.0,
        growths: int = 3,
        preference: tuple[str, ...] = PREFERENCE,
        hidden_only: bool = True,
    ) -> None:
        self.interval = _fraction("interval", interval)
        self.start = _fraction("start", start, low_open=False)
        self.growths = _count("growths", growths)
        super().__init__(observation_space, action_space, blueprints, preference, hidden_only)

    def grow(self, obs, progress, n_nodes):
        if self.grown >= self.growths or progress < self.start + self.grown * self.interval:
            return None
        mass = ObsView(obs).node("log_out_grad")
        for n in sorted(self.layers(n_nodes), key=lambda n: (-float(mass[n]), n)):
            action = self.germination(obs, n)
            if action is not None:
                return action
        return None


class ReactiveAgent(GrowthRule):
    """A reactive baseline that reads the run: grow a clean run that learns too slowly to finish.

    Not a published method: the rule the measured value of reacting asks for (DESIGN.md,
    "Baselines": at a high rent, clean under-trained runs want growth, noisy or converged ones
    do not, and only the run shows which is which). From `look` (training progress) to `late`,
    at each step it reads, from the observation's globals:
    - the val-acc slope: accuracy gained per unit of progress over the last `window` steps
      (its own memory of `val_acc` and `progress`);
    - the val accuracy itself: a converged run is already high;
    - the train/val gap (train_acc - val_acc): noisy labels make training accuracy the lower.
    The run is slow but learning, so growth pays, when `min_slope` <= slope <= `max_slope`
    (still learning, not a noise plateau; but slowly: a fast learner catches up without help),
    val_acc <= `max_acc` (far from done: not converged) and the gap is at least `-max_gap`
    (clean labels). A bound of -1 or inf turns its check off. The first time that holds it germinates `growths` seeds on
    consecutive steps, one layer after another (hidden layers first, `hidden_only`), and never
    again; seeds advance as soon as the mask allows and are never culled. A run that never
    qualifies stays the static host (NoOp). Thresholds are tuned on train contexts
    (experiments/tune_rules.py, conf/rule_params.yaml).
    """

    def __init__(
        self,
        observation_space: spaces.Dict,
        action_space: spaces.Discrete,
        blueprints: tuple[str, ...] | None = None,
        look: float = 0.1,
        min_slope: float = 0.2,
        max_slope: float = math.inf,
        max_acc: float = 0.75,
        max_gap: float = 0.02,
        growths: int = 3,
        window: int = 3,
        late: float = 0.6,
        preference: tuple[str, ...] = PREFERENCE,
        hidden_only: bool = False,
    ) -> None:
        self.look = _fraction("look", look, low_open=False)
        self.late = _fraction("late", late)
        self.max_acc = _fraction("max_acc", max_acc)
        for name, value in (
            ("min_slope", min_slope),
            ("max_slope", max_slope),
            ("max_gap", max_gap),
        ):
            ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
            if not (ok and not math.isnan(value)):
                raise ValueError(f"{name}={value!r} must be a number")
        self.min_slope, self.max_slope = float(min_slope), float(max_slope)
        self.max_gap = float(max_gap)
        self.growths = _count("growths", growths)
        self.window = _count("window", window)
        super().__init__(observation_space, action_space, blueprints, preference, hidden_only)

    def reset(self) -> None:
        super().reset()
        self.history: list[tuple[float, float]] = []  # (progress, val_acc) at each step
        self.triggered = False

    def act(self, obs, info=None):
        view = ObsView(obs)
        progress = float(view.glob("progress"))
        if progress == 0 and (self.grown or self.history):  # a new episode
            self.reset()
        self.history.append((progress, float(view.glob("val_acc"))))
        return super().act(obs, info)

    def slope(self) -> float:
        """Val accuracy gained per unit of progress over the last `window` steps (NaN before)."""
        if len(self.history) <= self.window:
            return math.nan
        (p0, a0), (p1, a1) = self.history[-1 - self.window], self.history[-1]
        return (a1 - a0) / (p1 - p0) if p1 > p0 else math.nan

    def slow(self, obs) -> bool:
        """The trigger: learning, but too slowly to finish, on clean labels."""
        view = ObsView(obs)
        val = float(view.glob("val_acc"))
        gap = float(view.glob("train_acc")) - val
        slope = self.slope()
        learning = self.min_slope <= slope <= self.max_slope
        return learning and val <= self.max_acc and gap >= -self.max_gap

    def grow(self, obs, progress, n_nodes):
        if self.grown >= self.growths:
            return None
        if not self.triggered:
            if not self.look <= progress < self.late or not self.slow(obs):
                return None
            self.triggered = True
        layers = list(self.layers(n_nodes))
        for k in range(len(layers)):  # one layer after another, wrapping
            action = self.germination(obs, layers[(self.grown + k) % len(layers)])
            if action is not None:
                return action
        return None


RULES = {
    "north": NorthAgent,
    "fragrow": FragrowAgent,
    "gradmax": GradmaxAgent,
    "reactive": ReactiveAgent,
}
# The parameters tune_rules.py searches per rule (the rest keep their defaults).
TUNED = {
    "north": ("threshold", "late"),
    "fragrow": ("growths", "alpha"),
    "gradmax": ("interval", "start", "growths"),
    "reactive": ("look", "min_slope", "max_slope", "max_acc", "max_gap", "growths"),
}


def tuned_params(task: str, rule: str) -> dict:
    """The parameters experiments/tune_rules.py chose for `rule` on `task`
    (conf/rule_params.yaml)."""
    import yaml

    from esper_gym import config_dir

    if rule not in RULES:
        raise ValueError(f"unknown growth rule {rule!r}; allowed: {', '.join(RULES)}")
    path = config_dir() / PARAMS_FILE
    doc = yaml.safe_load(path.read_text()) or {}
    entry = (doc.get(task) or {}).get(rule)
    if entry is None:
        tuned = ", ".join(t for t in doc if rule in (doc[t] or {})) or "none"
        raise ValueError(
            f"no tuned {rule} parameters for task {task!r} in {path} (tuned: {tuned}); run "
            f"`python experiments/tune_rules.py --task {task} --contexts train`, or pass "
            f"params={{...}} ({', '.join(TUNED[rule])})"
        )
    return dict(entry["params"])


def rule_params(task: str, rule: str, params: Mapping | None) -> dict:
    """The keyword arguments of growth rule `rule` on `task`: `params` checked against the
    rule's parameters, or the task's tuned ones when `params` is None."""
    if rule not in RULES:
        raise ValueError(f"unknown growth rule {rule!r}; allowed: {', '.join(RULES)}")
    if params is None:
        return tuned_params(task, rule)
    allowed = [
        p
        for p in inspect.signature(RULES[rule]).parameters
        if p not in ("observation_space", "action_space")
    ]
    if not isinstance(params, Mapping):
        raise ValueError(f"{rule} params={params!r} must be a mapping of {', '.join(allowed)}")
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        raise ValueError(f"{rule} params {unknown} unknown; allowed: {', '.join(allowed)}")
    return dict(params)
