"""Tamiyo's learner: PPO in CleanRL's order (ppo.py, with action masks and graph observations).

`train(config, make_env)` builds the vector env and the policy, optionally warm-starts it by
imitation (esper_gym.agents.tamiyo.imitation), then repeats rollout -> GAE -> update -> log,
checkpointing (esper_gym.agents.tamiyo.checkpoint) and checking the guards
(esper_gym.agents.tamiyo.guards) after every update. The settings are `PPOConfig`
(esper_gym.agents.tamiyo.config).
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable, Sequence

import gymnasium as gym
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.distributions import Categorical

from esper_gym.actions import ADVANCE, CULL, GERMINATE, WAIT
from esper_gym.agents.baselines import layout_from_spaces
from esper_gym.agents.graph import index_obs, obs_to_batch
from esper_gym.agents.records import check_env_record, env_record, mixture_record
from esper_gym.agents.tamiyo.checkpoint import load_checkpoint, save_checkpoint
from esper_gym.agents.tamiyo.config import PPOConfig
from esper_gym.agents.tamiyo.guards import TrainingCollapse, check_guards
from esper_gym.agents.tamiyo.imitation import fit_imitation, imitate, make_teacher
from esper_gym.agents.tamiyo.policy import TamiyoPolicy
from esper_gym.agents.tamiyo.popart import update_return_stats
from esper_gym.agents.tamiyo.runners import (  # noqa: F401  (make_vector_env: ppo's API)
    RemoteRunners,
    Runner,
    build_vector_env,
    make_vector_env,
    resolve_runners,
)

LOG = logging.getLogger(__name__)


def _warn_budget(config, step, end_step, batch_size, n_envs, imitated, resumed) -> None:
    """One line (logging, esper_gym.agents.tamiyo.ppo) when the run does not end at exactly
    `config.total_steps` env steps: PPO's whole rollouts, or a warm start the budget cut."""
    if imitated is not None and imitated < config.imitation_episodes:
        LOG.warning(
            "total_steps=%d ends in the imitation warm start: %d env steps, %d of "
            "imitation_episodes=%d teacher episodes, no PPO update",
            *(config.total_steps, step, imitated, config.imitation_episodes),
        )
    elif end_step != config.total_steps and not (resumed and step >= config.total_steps):
        # e.g. 1024 asked, 8 envs x 64 steps after 192 imitation steps: 192 + 2 x 512 = 1216
        LOG.warning(
            "total_steps=%d is rounded to whole PPO rollouts of %d env steps (%d envs x "
            "rollout_steps=%d): this run ends at %d env steps (%s%d updates)",
            *(config.total_steps, batch_size, n_envs, config.rollout_steps, end_step),
            f"{step} imitation steps + " if imitated is not None else "",
            (end_step - step) // batch_size,
        )


def explained_variance(pred: np.ndarray, target: np.ndarray) -> float:
    var = np.var(target)
    return float("nan") if var == 0 else float(1 - np.var(target - pred) / var)


def group_seeds(seed: int, n_envs: int, group: int) -> int | list[int]:
    """The reset seed(s) of `n_envs` copies: `seed` (copy i gets seed + i), or with groups of
    `group` >= 2 copies one seed per group (copy i gets seed + i // group): common random
    numbers, the copies of a group play the same context, init and data order."""
    return seed if group < 2 else [seed + i // group for i in range(n_envs)]


def rloo_advantages(
    rewards: torch.Tensor,
    dones: torch.Tensor,
    fresh: torch.Tensor,
    next_done: torch.Tensor,
    group: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Group-relative (leave-one-out) advantages of a rollout: (advantages, valid), both
    (n_steps, n_envs). `dones[t, i]` says copy i's observation t starts an episode (the
    previous one ended at t - 1), `fresh[i]` that observation 0 does, `next_done[i]` that the
    last step ended one. The k-th episode played whole in the rollout by each copy of a group
    (copies g * group ... (g + 1) * group - 1) gets, on each of its steps, its undiscounted
    return minus the mean of the other copies' k-th returns; so a group's advantages sum to 0
    per episode. Steps of episodes cut by the rollout's ends, or with no counterpart in every
    copy of the group, are not valid (advantage 0)."""
    n_steps, n_envs = rewards.shape
    segments = []  # per copy: [(start, end)] of episodes played whole in the rollout
    for i in range(n_envs):
        ends = [t for t in range(1, n_steps) if dones[t, i]] + ([n_steps] if next_done[i] else [])
        start, segs = (0 if fresh[i] else None), []
        for end in ends:
            if start is not None:
                segs.append((start, end))
            start = end
        segments.append(segs)
    advantages = torch.zeros_like(rewards)
    valid = torch.zeros(n_steps, n_envs, dtype=torch.bool)
    for g in range(0, n_envs, group):
        members = range(g, g + group)
        for k in range(min(len(segments[i]) for i in members)):
            rets = torch.stack([rewards[slice(*segments[i][k]), i].sum() for i in members])
            loo = (rets.sum() - rets) / (group - 1)
            for j, i in enumerate(members):
                advantages[slice(*segments[i][k]), i] = rets[j] - loo[j]
                valid[slice(*segments[i][k]), i] = True
    return advantages, valid


def teacher_actions(teachers, obs_buf: dict, dones: torch.Tensor, fresh: torch.Tensor):
    """The teachers' actions (n_steps, n_envs) along the rollout's own episodes: teacher i is
    replayed on copy i's observations in order, reset where an episode starts."""
    n_steps, n_envs = dones.shape
    out = torch.zeros(n_steps, n_envs, dtype=torch.long)
    for i, teacher in enumerate(teachers):
        for t in range(n_steps):
            if ((fresh[i] if t == 0 else dones[t, i]) > 0) and hasattr(teacher, "reset"):
                teacher.reset()
            out[t, i] = int(teacher.act({k: v[t, i] for k, v in obs_buf.items()}))
    return out


def anchor_kl(
    logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, smoothing: float
) -> torch.Tensor:
    """Mean KL(q || policy) where q is one-hot on `target` (the teacher's action), smoothed by
    `smoothing` spread evenly over the valid actions (`mask`). 0 when the policy is q."""
    valid = mask.float()
    q = smoothing * valid / valid.sum(1, keepdim=True).clamp_min(1.0)
    q = q + (1 - smoothing) * F.one_hot(target, logits.shape[1]).float()
    log_q = q.clamp_min(1e-12).log()
    return (q * (log_q - logits.log_softmax(1))).sum(1).mean()


def train(
    config: PPOConfig,
    make_env: Callable[[], gym.Env] | Sequence[Callable[[], gym.Env]],
    log: Callable[[dict, int], None] | None = None,
    checkpoint_path: str | os.PathLike | None = None,
    resume_from: str | os.PathLike | None = None,
    runners: int | str | None = None,
    ray_address: str | None = None,
) -> TamiyoPolicy:
    """PPO (CleanRL's ppo.py, with action masks and graph observations) -> trained policy.

    Every update calls `log(metrics, global_step)` with: losses/{policy,value,entropy,
    approx_kl,clip_frac,ratio_start,explained_variance}, actions/{wait,germinate,advance,cull}
    (counts in the rollout), charts/{steps_per_s,lr,episodes,episodic_return,episodic_length}
    (the two last only when an episode ended in the rollout; with several tasks also
    charts/episodic_return/<task> for each), uncertainty/{value_std,entropy},
    diagnostics/wait_share (WAIT among the actions taken while some GERMINATE was valid; NaN if
    none was), diagnostics/entropy (mean entropy of the acting policy over the rollout) and
    diagnostics/churn (CULL actions per episode ended in the rollout: a seed is only culled after
    it was germinated, so each is a germinate -> cull cycle; only when an episode ended). Then
    `config.guards` checks them (`check_guards`): a collapse stops the run with TrainingCollapse.

    With `checkpoint_path` the run is saved every `config.checkpoint_every` updates and at the
    end. `resume_from` continues that run: weights, optimizer, global_step, return statistics
    and torch RNG come back; episodes in flight at the save are lost (envs are reset, with
    seeds offset by global_step so that they are new episodes). Dropout is off both while
    acting and during updates (the policy updated is the one that acted: the first ratio of
    each update is exactly 1, logged as losses/ratio_start); MC dropout is a separate pass.

    Rollouts on Ray actors: `runners` (else `config.runners`) K > 0 collects them on K actors
    of `config.num_envs` copies each (esper_gym.agents.tamiyo.runners; "auto": one per CPU Ray
    sees), on the Ray at `ray_address` (else `config.ray_address`; None: started embedded);
    every update then also logs timing/{rollout_s,update_s,broadcast_s,transfer_s}. 0 (the
    default): in this process, the run it always was.

    Several tasks at once: `make_env` a sequence of env constructors (one per task, with the
    same observation and action spaces and blueprint library) trains one policy on
    `config.num_envs` copies of each (esper_gym.multitask.ConcatVectorEnv); each copy's teacher
    is the teacher of its own task (its tuned schedule).
    """
    # One env per task in this process describes them (an Esper env loads no data until reset),
    # and a checkpoint of another task or blueprint library is refused before any worker starts.
    makers = list(make_env) if isinstance(make_env, Sequence) else [make_env]
    # Rollouts on K Ray actors (esper_gym.agents.tamiyo.runners), each `num_envs` copies per
    # task; 0: in this process. The arguments win over config.runners / config.ray_address.
    runners = getattr(config, "runners", 0) if runners is None else runners
    ray_address = ray_address or getattr(config, "ray_address", None)
    n_runners = resolve_runners(runners, ray_address)
    copies = config.num_envs * max(n_runners, 1)  # per task, over all runners
    records, teachers, probes = [], [], []
    for make in makers:
        probe = make()
        probes.append(probe)  # closed below; its spaces and task still describe the run
        records.append(env_record(probe))
        if config.teacher is not None and resume_from is None:
            # On Ray the runners build their own: one here refuses a bad name before they start.
            n_teachers = copies if n_runners == 0 else 1
            teachers += [make_teacher(config.teacher, probe) for _ in range(n_teachers)]
        probe.close()
    record = mixture_record(records)
    group = getattr(config, "group_advantages", 0)
    anchor_coef = getattr(config, "anchor_coef", 0.0)
    if (group or anchor_coef) and (n_runners > 0 or len(makers) > 1):
        raise ValueError(
            "group_advantages and anchor_coef train on one task in this process (runners=0)"
        )
    anchors = []
    if anchor_coef > 0:  # the teacher replayed along the policy's episodes, one per copy
        anchors = [make_teacher(config.teacher, probes[0]) for _ in range(copies)]
    ckpt = None
    if resume_from is not None:
        ckpt = load_checkpoint(resume_from, env=probes[0])  # sizes checked before building
        check_env_record(ckpt.env, record, resume_from, same_task=True)
    torch.manual_seed(config.seed)
    # In this process: the envs PPO collects from (runners=0), or those of the imitation warm
    # start only (runners > 0: the same copies and seeds as one process would have).
    envs = None
    if n_runners == 0:
        envs = build_vector_env(makers, copies, config.async_envs)
    space = envs.single_observation_space if envs is not None else probes[0].observation_space
    action_space = envs.single_action_space if envs is not None else probes[0].action_space
    layout = layout_from_spaces(space, action_space)  # for the action histogram
    kind_of = np.array([layout.decode(a).kind for a in range(layout.size)])
    is_germinate = kind_of == GERMINATE
    n_envs, n_steps = copies * len(makers), config.rollout_steps
    # Copy i's task, in one runner (runners=0: this process's only one).
    env_task = [str(rec.get("task")) for rec in records for _ in range(config.num_envs)]
    batch_size = n_envs * n_steps
    minibatch_size = max(batch_size // config.minibatches, 1)

    policy = TamiyoPolicy.for_space(
        space,
        hidden=config.hidden,
        layers=config.layers,
        dropout=config.dropout,
        wait_bias=config.wait_bias,
        gated=config.gated,
    )
    optimizer = torch.optim.Adam(policy.parameters(), lr=config.lr, eps=1e-5, foreach=True)
    global_step = 0
    if ckpt is not None:
        policy = ckpt.policy
        optimizer = torch.optim.Adam(policy.parameters(), lr=config.lr, eps=1e-5, foreach=True)
        if ckpt.optimizer_state is not None:
            optimizer.load_state_dict(ckpt.optimizer_state)
        global_step = ckpt.global_step
        if ckpt.torch_rng is not None:
            torch.set_rng_state(ckpt.torch_rng)

    # The rollout's collector: observations stay numpy (obs_to_batch batches them per
    # minibatch). In this process it acts with `policy` itself and torch's global RNG.
    remote = None
    if n_runners == 0:
        runner = Runner(envs, policy, kind_of, env_task, config.gamma)
        next_obs = runner.reset(group_seeds(config.seed + global_step, n_envs, group))
    else:
        remote = RemoteRunners(
            n_runners,
            makers,
            config.num_envs,
            config.async_envs,
            policy,
            kind_of,
            env_task,
            config.gamma,
            address=ray_address,
        )
    guard_history: dict[str, list[float]] = {}

    imitated = None
    if teachers:
        # The teacher's env steps count in the budget, and never run past it. On Ray the
        # runners play it (the same episodes); this process fits.
        if remote is None:
            _, global_step, metrics = imitate(
                policy, optimizer, envs, teachers, next_obs, config, budget=config.total_steps
            )
        else:
            episodes, global_step = remote.imitate(
                config.teacher, config, config.total_steps, config.seed, step=global_step
            )
            metrics = fit_imitation(policy, optimizer, episodes, global_step, config, n_envs)
        imitated = metrics["imitation/episodes"]
        if log is not None:
            log(metrics, global_step)
        if checkpoint_path is not None:  # the warm start alone is a policy to evaluate
            save_checkpoint(checkpoint_path, policy, optimizer, global_step, config, record)
        if remote is None:
            # whole episodes for PPO
            next_obs = runner.reset(group_seeds(config.seed + global_step, n_envs, group))
    if remote is not None:
        remote.reset(config.seed + global_step, global_step)

    # PPO runs whole rollouts of batch_size steps: the budget left, rounded to the nearest
    # number of them (at least one for a run that starts from scratch). The end is the same from
    # any step on the way, so a resumed run ends where the uninterrupted one would.
    left = max(config.total_steps - global_step, 0)
    num_updates = (2 * left + batch_size) // (2 * batch_size)
    if global_step == 0 and left > 0:
        num_updates = max(num_updates, 1)
    if imitated is not None and imitated < config.imitation_episodes:
        num_updates = 0  # the warm start was cut by the budget: nothing left for PPO
    end_step = global_step + num_updates * batch_size
    fresh = torch.ones(n_envs)  # observation 0 of the next rollout starts an episode
    _warn_budget(config, global_step, end_step, batch_size, n_envs, imitated, ckpt is not None)
    pending = None  # on Ray: the rollout the runners are playing
    if remote is not None and num_updates > 0:
        pending = remote.start(policy, n_steps, step=global_step)
    for u in range(num_updates):
        update = global_step // batch_size + 1  # checkpoint_every counts these
        if config.anneal_lr:
            frac = global_step / end_step  # 0 at the first update without a warm start
            optimizer.param_groups[0]["lr"] = config.lr + frac * (config.lr_final - config.lr)
        start = time.perf_counter()

        # --- rollout: act with dropout off --------------------------------------------------
        timing = {}
        if remote is None:
            rollout = runner.collect(None, n_steps)
        else:
            rollout, timing = remote.finish(pending)
        global_step += batch_size
        obs_buf, actions, logprobs = rollout["obs"], rollout["actions"], rollout["logprobs"]
        rewards, dones, values = rollout["rewards"], rollout["dones"], rollout["values"]
        entropies, next_obs = rollout["entropies"], rollout["next_obs"]
        next_done = rollout["next_done"]
        finished = rollout["finished"]
        finished_returns, finished_lengths = finished["returns"], finished["lengths"]
        finished_culls, finished_tasks = finished["culls"], finished["tasks"]
        update_start = time.perf_counter()
        rollout_fresh, fresh = fresh, next_done.clone()

        # --- GAE ----------------------------------------------------------------------------
        with torch.no_grad():
            next_value = policy(obs_to_batch(next_obs))[1]
        advantages = torch.zeros_like(rewards)
        last_gae = torch.zeros(n_envs)
        for t in reversed(range(n_steps)):
            if t == n_steps - 1:
                next_nonterminal, next_values = 1.0 - next_done, next_value
            else:
                next_nonterminal, next_values = 1.0 - dones[t + 1], values[t + 1]
            delta = rewards[t] + config.gamma * next_values * next_nonterminal - values[t]
            last_gae = delta + config.gamma * config.gae_lambda * next_nonterminal * last_gae
            advantages[t] = last_gae
        returns = advantages + values
        # The policy's advantages: GAE's, or group-relative ones (the critic trains on GAE's
        # returns either way); pg_valid weighs each step in the policy loss.
        pg_adv, pg_valid = advantages, torch.ones_like(advantages, dtype=torch.bool)
        if group:
            pg_adv, pg_valid = rloo_advantages(rewards, dones, rollout_fresh, next_done, group)
        coef = 0.0
        if anchor_coef > 0:
            decay = config.anchor_decay_steps or end_step
            coef = anchor_coef * max(0.0, 1.0 - (global_step - batch_size) / decay)
            b_teacher = teacher_actions(anchors, obs_buf, dones, rollout_fresh).flatten()

        if config.norm_returns:
            update_return_stats(policy, returns.flatten())
        value_scale = (policy.ret_var + 1e-8).sqrt() if config.norm_returns else torch.ones(())

        # --- update: the policy that acted (dropout off), so the first ratio is exactly 1 ----
        b_obs = {k: v.reshape(batch_size, *v.shape[2:]) for k, v in obs_buf.items()}
        b_actions, b_logprobs = actions.flatten(), logprobs.flatten()
        b_adv, b_returns, b_values = pg_adv.flatten(), returns.flatten(), values.flatten()
        b_valid = pg_valid.flatten()
        anchor_losses = []
        policy.eval()  # MC-dropout uncertainty is a separate pass (policy.uncertainty)
        clip_fracs, approx_kl = [], torch.zeros(())
        ratio_start = None
        for _epoch in range(config.update_epochs):
            perm = torch.randperm(batch_size)
            for lo in range(0, batch_size, minibatch_size):
                mb = perm[lo : lo + minibatch_size]
                logits, new_value = policy(obs_to_batch(index_obs(b_obs, mb.numpy())))
                dist = Categorical(logits=logits)
                new_logprob = dist.log_prob(b_actions[mb])
                entropy = dist.entropy().mean()
                log_ratio = new_logprob - b_logprobs[mb]
                ratio = log_ratio.exp()
                if ratio_start is None:  # before any step: must be 1 (acting == updating)
                    ratio_start = (ratio.detach() - 1).abs().max().item()
                with torch.no_grad():
                    approx_kl = ((ratio - 1) - log_ratio).mean()
                    clip_fracs.append(((ratio - 1.0).abs() > config.clip_coef).float().mean())

                adv, w = b_adv[mb], b_valid[mb].float()
                if group:  # already centred per group: scaled only, over the valid steps
                    if config.norm_adv and w.sum() > 1:
                        adv = adv / (adv[w > 0].std() + 1e-8)
                elif config.norm_adv and len(mb) > 1:
                    adv = (adv - adv.mean()) / (adv.std() + 1e-8)
                pg_loss = torch.max(
                    -adv * ratio, -adv * ratio.clamp(1 - config.clip_coef, 1 + config.clip_coef)
                )
                pg_loss = (pg_loss * w).sum() / w.sum().clamp_min(1.0)

                # Value loss in normalised units (value_scale is 1 without norm_returns).
                v_new = new_value / value_scale
                v_target = b_returns[mb] / value_scale
                if config.clip_vloss:
                    v_old = b_values[mb] / value_scale
                    v_clipped = v_old + (v_new - v_old).clamp(-config.clip_coef, config.clip_coef)
                    v_loss = 0.5 * torch.max((v_new - v_target) ** 2, (v_clipped - v_target) ** 2)
                    v_loss = v_loss.mean()
                else:
                    v_loss = 0.5 * ((v_new - v_target) ** 2).mean()

                loss = pg_loss - config.ent_coef * entropy + config.vf_coef * v_loss
                if config.ent_floor > 0:
                    loss = loss + config.ent_floor_coef * F.relu(config.ent_floor - entropy)
                if coef > 0:
                    mask = torch.as_tensor(b_obs["action_mask"][mb.numpy()]).bool()
                    anchor = anchor_kl(logits, b_teacher[mb], mask, config.anchor_smoothing)
                    anchor_losses.append(anchor.detach())
                    loss = loss + coef * anchor
                optimizer.zero_grad()
                loss.backward()
                nn.utils.clip_grad_norm_(policy.parameters(), config.max_grad_norm)
                optimizer.step()
            if config.target_kl is not None and approx_kl > config.target_kl:
                break

        if remote is not None:  # where a distributed update's time goes (bench_scale.py)
            timing["timing/update_s"] = time.perf_counter() - update_start
            if u + 1 < num_updates:  # the runners play the next rollout while this logs
                pending = remote.start(policy, n_steps, step=global_step)
        # --- log ----------------------------------------------------------------------------
        kinds = kind_of[b_actions.numpy()].tolist()
        growth_valid = b_obs["action_mask"][:, is_germinate].any(1)
        waited = kind_of[b_actions.numpy()] == WAIT
        metrics = {
            "losses/policy": pg_loss.item(),
            "losses/value": v_loss.item(),
            "losses/entropy": entropy.item(),
            "losses/approx_kl": approx_kl.item(),
            "losses/clip_frac": torch.stack(clip_fracs).mean().item(),
            "losses/ratio_start": ratio_start,
            "losses/explained_variance": explained_variance(b_values.numpy(), b_returns.numpy()),
            **{f"actions/{k}": kinds.count(k) for k in (WAIT, GERMINATE, ADVANCE, CULL)},
            "charts/steps_per_s": batch_size / (time.perf_counter() - start),
            **timing,
            "charts/lr": optimizer.param_groups[0]["lr"],
            "charts/episodes": len(finished_returns),
            "diagnostics/wait_share": (
                float(waited[growth_valid].mean()) if growth_valid.any() else math.nan
            ),
            "diagnostics/entropy": entropies.mean().item(),
        }
        if group:
            metrics["diagnostics/group_valid"] = pg_valid.float().mean().item()
        if anchor_coef > 0:
            metrics["charts/anchor_coef"] = coef
            if anchor_losses:
                metrics["losses/anchor"] = torch.stack(anchor_losses).mean().item()
        if finished_returns:
            metrics["charts/episodic_return"] = float(np.mean(finished_returns))
            if len(records) > 1:  # several tasks: their returns are on different scales
                for task in dict.fromkeys(finished_tasks):
                    mine = [r for r, t in zip(finished_returns, finished_tasks) if t == task]
                    metrics[f"charts/episodic_return/{task}"] = float(np.mean(mine))
            metrics["charts/episodic_length"] = float(np.mean(finished_lengths))
            metrics["diagnostics/churn"] = float(np.mean(finished_culls))
        if config.uncertainty_samples > 0:
            unc = policy.uncertainty(obs_to_batch(next_obs), config.uncertainty_samples)
            metrics["uncertainty/value_std"] = unc["value_std"].mean().item()
            metrics["uncertainty/entropy"] = unc["entropy"].mean().item()
        if log is not None:
            log(metrics, global_step)
        if checkpoint_path is not None and (
            update % config.checkpoint_every == 0 or global_step >= end_step
        ):
            save_checkpoint(checkpoint_path, policy, optimizer, global_step, config, record)
        try:
            check_guards(metrics, config.guards, guard_history, global_step)
        except TrainingCollapse:
            (runner if remote is None else remote).close()
            if checkpoint_path is not None:  # the collapsed policy, for a post-mortem
                save_checkpoint(checkpoint_path, policy, optimizer, global_step, config, record)
            raise

    (runner if remote is None else remote).close()
    policy.eval()
    return policy
