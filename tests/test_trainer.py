"""HostTrainer: one fused optimizer over the running seeds, one finiteness check per step."""

import gymnasium as gym
import torch
from torch import nn

import esper_gym  # noqa: F401  (registers the ids)
from esper_gym.kasmina import SeedState


class _NanGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, s):
        return s.clone()

    @staticmethod
    def backward(ctx, g):
        return torch.full_like(g, float("nan"))


class NanGradKernel(nn.Module):
    """A learnable kernel whose parameter always gets a NaN gradient."""

    def __init__(self, width):
        super().__init__()
        self.scale = nn.Parameter(torch.zeros(width))

    def forward(self, x):
        return _NanGrad.apply(x * self.scale)


def _env(tmp_path):
    env = gym.make("Esper/Spirals-v0", kernel_dir=tmp_path, seed_slots=2)
    env.reset(seed=0)
    return env.unwrapped


def _germinate(u, layer, slot, name="residual_mlp"):
    from esper_gym.kernels import load_or_compile

    shape = u.layers[layer].out_shape
    blueprint = u.generator.propose(shape, name, u.task.param_budget)
    kernel, meta = load_or_compile(blueprint, shape, u.store, u.cache)
    u.layers[layer].germinate(slot, kernel, name, meta.sha256)
    return kernel


def test_running_seeds_share_one_optimizer_with_state_carried_over(tmp_path):
    u = _env(tmp_path)
    first = _germinate(u, 0, 0)
    u.layers[0].advance(0)  # TRAINING: learns the pseudo-residual
    assert u.layers[0].slots[0].optimizer is None  # the trainer steps it
    before = [p.detach().clone() for p in first.parameters()]
    u.trainer.run_interval(4)
    assert any(not torch.equal(a, b) for a, b in zip(before, first.parameters()))
    opt = u.trainer.seed_optimizer
    assert opt is u.trainer.optimizer  # an Adam host: one fused step for host and seeds
    seed_groups = opt.param_groups[1:]
    assert len(seed_groups) == 1 and seed_groups[0]["lr"] == u.task.seed_lr
    steps = [int(opt.state[p]["step"]) for p in first.parameters()]
    assert steps == [4] * len(steps)

    second = _germinate(u, 1, 0)
    u.layers[1].advance(0)
    u.trainer.run_interval(2)
    opt = u.trainer.seed_optimizer
    assert len(opt.param_groups) == 3
    assert [int(opt.state[p]["step"]) for p in first.parameters()] == [6] * len(steps)
    assert [int(opt.state[p]["step"]) for p in second.parameters()] == [2] * len(steps)

    third = _germinate(u, 2, 0)  # the same size as `second`: groups that compare alike
    u.layers[2].advance(0)
    u.trainer.run_interval(1)
    u.layers[1].cull(0)  # dropped after a group of equal shapes (`first`): found by identity
    u.trainer.run_interval(1)
    u.layers[0].cull(0)
    u.trainer.run_interval(1)
    held = {id(p) for g in u.trainer.seed_optimizer.param_groups[1:] for p in g["params"]}
    assert held == {id(p) for p in third.parameters()}
    assert not any(p in u.trainer.seed_optimizer.state for p in first.parameters())
    assert not any(p in u.trainer.seed_optimizer.state for p in second.parameters())


def test_an_sgd_host_gives_the_seeds_an_adam_of_their_own(tmp_path):
    env = gym.make("Esper/Spirals-v0", kernel_dir=tmp_path, optimizer="sgd")
    env.reset(seed=0)
    u = env.unwrapped
    kernel = _germinate(u, 0, 0)
    u.layers[0].advance(0)
    u.trainer.run_interval(3)
    opt = u.trainer.seed_optimizer
    assert isinstance(opt, torch.optim.Adam) and opt is not u.trainer.optimizer
    assert [int(opt.state[p]["step"]) for p in kernel.parameters()] == [3] * 4


def test_a_seed_with_nan_gradients_is_faulted_not_stepped(tmp_path):
    u = _env(tmp_path)
    width = u.layers[0].out_shape[0]
    bad = NanGradKernel(width)
    u.layers[0].germinate(0, bad, "nan_grad")
    u.layers[0].advance(0)  # TRAINING: its input is detached, the host is untouched
    good = _germinate(u, 1, 0)
    u.layers[1].advance(0)
    host = [p.detach().clone() for p in u.trainer.host_params]
    good_before = [p.detach().clone() for p in good.parameters()]
    u.trainer.run_interval(1)
    _, faults = u.layers[0].drain()
    assert [f.kind for f in faults] == ["nonfinite_grad"]
    assert torch.equal(bad.scale, torch.zeros(width))  # not updated
    assert any(not torch.equal(a, b) for a, b in zip(good_before, good.parameters()))
    assert all(torch.isfinite(p).all() for p in u.trainer.host_params)
    assert any(not torch.equal(a, b) for a, b in zip(host, u.trainer.host_params))
    u.trainer.run_interval(2)  # third fault: its breaker culls it
    assert u.layers[0].slots[0].state in (SeedState.CULLED, SeedState.EMBARGOED)


def test_contributions_use_the_fixed_subset(tmp_path):
    u = _env(tmp_path)
    _germinate(u, 0, 0)
    u.layers[0].advance(0)
    u.trainer.run_interval(8)
    acc, _ = u.trainer.evaluate()
    calls = []
    real = u.trainer._accuracy

    def spy(x, y):
        calls.append(len(x))
        return real(x, y)

    u.trainer._accuracy = spy
    u.trainer.measure_contributions(acc)
    assert calls == [u.task.contribution_size]  # one extra pass, on the subset only
    # The lean pass gives what `evaluate` gives: the TRAINING seed's effect at alpha 1.
    n = u.task.contribution_size
    assert u.layers[0].slots[0].state == SeedState.TRAINING
    with u.layers[0].seed_override(0, 1.0):
        on, _ = u.trainer.evaluate(u.trainer.x_val[:n], u.trainer.y_val[:n])
    current, _ = u.trainer.evaluate(u.trainer.x_val[:n], u.trainer.y_val[:n])
    assert on != current
    assert u.layers[0].slots[0].contribution == on - current


def test_a_poisoned_host_gradient_faults_only_its_culprit(tmp_path):
    from tests.hostile import NanBackward

    u = _env(tmp_path)
    upstream = _germinate(u, 0, 0)
    for _ in range(2):
        u.layers[0].advance(0)  # BLENDING: the NaN from downstream reaches its gradients too
    u.layers[1].germinate(0, NanBackward(), "nan_backward")
    for _ in range(2):
        u.layers[1].advance(0)
    u.trainer.run_interval(1)  # alpha 0 on the first blending step: the culprit does not run yet
    assert u.layers[1].drain()[1] == []
    before = [p.detach().clone() for p in upstream.parameters()]
    u.trainer.run_interval(1)
    _, upstream_faults = u.layers[0].drain()
    _, culprit_faults = u.layers[1].drain()
    assert upstream_faults == []  # passing the NaN on is not a fault of its own
    assert [f.kind for f in culprit_faults] == ["host_grad"]
    assert all(torch.equal(a, b) for a, b in zip(before, upstream.parameters()))  # step skipped
    assert u.layers[0].slots[0].state == SeedState.BLENDING
