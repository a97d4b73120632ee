"""Tamiyo's training settings: `PPOConfig` (PPO, the network's sizes, the imitation warm start)
and `GuardConfig` (when a collapsing run stops). The defaults live here and only here.

Nothing heavy is imported (no torch, no torch_geometric), so that a Hydra schema or a config
check can import these in milliseconds; esper_gym.agents.tamiyo.ppo is what uses them.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class GuardConfig:
    """Failure modes PPO slides into without an error, checked after every update.

    Each guard watches one logged metric; when its condition holds for `patience` consecutive
    updates the run stops with `TrainingCollapse`, whose message names the metric, its recent
    values, the threshold's config key and what to try (a checkpoint is written first, when
    the run has a checkpoint path). A threshold of None turns that guard off, `enabled=False`
    all of them. A NaN metric (e.g. no episode state where growth was valid) counts as healthy.

    - WAIT collapse: `diagnostics/wait_share` (WAIT among the rollout's actions taken while a
      GERMINATE was valid) above `wait_share_max`: the policy has learned that doing nothing
      is safe and stopped trying growth.
    - entropy collapse: `diagnostics/entropy` (mean entropy of the acting policy over the
      rollout, nats) below `entropy_min`: it no longer explores, whatever it settled on.
    - a critic that predicts nothing: `losses/explained_variance` at or below
      `explained_variance_min`: advantages are then noise and the policy gradient with them.
    """

    enabled: bool = True
    patience: int = 5  # consecutive updates
    wait_share_max: float | None = 0.95
    entropy_min: float | None = 0.05
    explained_variance_min: float | None = 0.0


@dataclass
class PPOConfig:
    total_steps: int = 20_000  # env steps over all envs
    num_envs: int = 4
    rollout_steps: int = 64  # per env per update
    gamma: float = 0.99
    gae_lambda: float = 0.95
    clip_coef: float = 0.2
    clip_vloss: bool = True
    ent_coef: float = 0.01
    # Entropy floor (nats): below it a hinge term `ent_floor_coef * (floor - entropy)` pushes
    # the policy back towards exploring. 0 turns it off; entropy is logged either way.
    ent_floor: float = 0.0
    ent_floor_coef: float = 0.1
    vf_coef: float = 0.5
    max_grad_norm: float = 0.5
    lr: float = 3e-4
    update_epochs: int = 4
    minibatches: int = 4
    target_kl: float | None = None
    anneal_lr: bool = True  # linearly from lr (first update) to lr_final (after the last)
    lr_final: float = 0.0
    norm_adv: bool = True
    # Value targets normalised by running return statistics: rewards of any scale then give a
    # value loss of order 1, which keeps explained variance from sitting at or below 0.
    norm_returns: bool = True
    seed: int = 0
    hidden: int = 64
    layers: int = 3
    dropout: float = 0.1
    async_envs: bool = False  # AsyncVectorEnv (spawn) instead of SyncVectorEnv
    # Rollouts on `runners` Ray actors of num_envs copies each (esper_gym.agents.tamiyo.runners);
    # 0: in this process; "auto": the CPUs Ray sees. ray_address: None embedded, "auto" a cluster.
    runners: int | str = 0
    ray_address: str | None = None
    checkpoint_every: int = 10  # updates; only when a checkpoint_path is given
    uncertainty_samples: int = 8  # MC-dropout passes on the last observations (0: skip)
    # Initial bias of the WAIT logit (0: WAIT is as likely as any one valid action). A prior
    # towards WAIT makes the untrained policy germinate and cull less often (churn).
    wait_bias: float = 0.0
    # The "WAIT or act" switch head (TamiyoPolicy, gated=True); wait_bias is then the switch's
    # initial logit: WAIT starts with probability sigmoid(wait_bias).
    gated: bool = False
    # Imitation warm start: before PPO, `imitation_episodes` episodes of the baseline `teacher`
    # (a name of esper_gym.agents.baselines.AGENTS, never a privileged one) are played on the
    # training envs and the policy is fitted to its actions (cross-entropy) and the critic to
    # its discounted returns for `imitation_epochs` epochs; PPO then starts from that policy.
    # None: no warm start (PPO from a random policy).
    teacher: str | None = None
    imitation_episodes: int = 64
    imitation_epochs: int = 10
    # Group-relative advantages with common random numbers (RLOO): G > 1 resets the copies in
    # groups of G with one seed per group (copy i gets seed + i // G instead of seed + i), so a
    # group shares context, init and data order and differs only in its sampled decisions. A
    # step's advantage is then its episode's return minus the mean return of the other G - 1
    # copies' episodes of that group (the k-th episode each ended in the rollout), used for the
    # policy loss instead of GAE; steps of episodes not played whole within one rollout train
    # the critic only (set rollout_steps to a multiple of the episode length). 0: GAE.
    group_advantages: int = 0
    # Anchor to the teacher: + coef * KL(q || policy) on the rollout's observations, where q is
    # the teacher's action (config.teacher, replayed along the policy's own episodes) one-hot,
    # smoothed by `anchor_smoothing` over the valid actions. coef = anchor_coef * (1 -
    # global_step / anchor_decay_steps), floored at 0 (anchor_decay_steps None: the run's last
    # step). 0: off.
    anchor_coef: float = 0.0
    anchor_decay_steps: int | None = None
    anchor_smoothing: float = 0.1
    guards: GuardConfig = field(default_factory=GuardConfig)

    def __post_init__(self) -> None:
        if not isinstance(self.guards, GuardConfig):  # a mapping: a config file, a checkpoint
            self.guards = GuardConfig(**dict(self.guards or {}))
        if self.imitation_episodes < 1 or self.imitation_epochs < 1:
            raise ValueError(
                f"imitation_episodes={self.imitation_episodes} and imitation_epochs="
                f"{self.imitation_epochs}: both must be >= 1 (teacher=null turns imitation off)"
            )
        if self.group_advantages < 0 or self.group_advantages == 1:
            raise ValueError(
                f"group_advantages={self.group_advantages}: 0 (GAE) or a group size >= 2"
            )
        if self.group_advantages and self.num_envs % self.group_advantages:
            raise ValueError(
                f"group_advantages={self.group_advantages} must divide num_envs={self.num_envs}"
            )
        if self.anchor_coef < 0 or not 0 <= self.anchor_smoothing < 1:
            raise ValueError(
                f"anchor_coef={self.anchor_coef} must be >= 0 and anchor_smoothing="
                f"{self.anchor_smoothing} in [0, 1)"
            )
        if self.anchor_coef > 0 and self.teacher is None:
            raise ValueError("anchor_coef > 0 anchors to the teacher: set teacher (e.g. schedule)")
