import copy
import itertools
import math
import time

import pytest
import torch
from torch import nn

from esper_gym.kasmina import (
    TRANSITIONS,
    IllegalTransition,
    KasminaLayer,
    SeedConfig,
    SeedState,
    blend_alpha,
    check_transition,
)
from esper_gym.kasmina.telemetry import activation_stats
from tests.hostile import Float64Delta

S = SeedState


class Residual(nn.Module):
    """A residual MLP kernel; `zero=False` gives it a non-zero output from the start."""

    def __init__(self, d: int, hidden: int = 32, zero: bool = True, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.a = nn.Linear(d, hidden)
        self.b = nn.Linear(hidden, d)
        with torch.no_grad():
            self.a.weight.copy_(torch.randn(hidden, d, generator=g) / math.sqrt(d))
            self.a.bias.zero_()
            if zero:
                self.b.weight.zero_()
            else:
                self.b.weight.copy_(torch.randn(d, hidden, generator=g) / math.sqrt(hidden))
            self.b.bias.zero_()

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


def two_layer(seed: int = 0, slots: int = 2, **cfg) -> nn.Sequential:
    torch.manual_seed(seed)
    config = SeedConfig(**cfg)
    return nn.Sequential(
        KasminaLayer(nn.Linear(2, 16), slots, "l0", config),
        nn.ReLU(),
        KasminaLayer(nn.Linear(16, 1), slots, "l1", config),
    )


def to_state(layer: KasminaLayer, slot: int, state: SeedState, kernel: nn.Module) -> None:
    layer.germinate(slot, kernel, "residual")
    path = [S.TRAINING, S.BLENDING, S.PROBATION, S.FOSSILIZED]
    for target in path[: path.index(state) + 1] if state in path else []:
        if target == S.PROBATION:
            while layer.slots[slot].state != S.PROBATION:
                layer.step_seeds()
        else:
            layer.advance(slot)


# ------------------------------------------------------------------ lifecycle
def test_every_transition_in_the_table_is_legal_and_every_other_raises():
    for src in S:
        for dst in S:
            if dst in TRANSITIONS[src]:
                check_transition(src, dst)
            else:
                with pytest.raises(IllegalTransition) as err:
                    check_transition(src, dst)
                assert src.name in str(err.value) and dst.name in str(err.value)


def test_layer_refuses_illegal_moves_with_state_names():
    layer = two_layer()[0]
    with pytest.raises(ValueError, match="DORMANT"):
        layer.advance(0)
    with pytest.raises(IllegalTransition, match="DORMANT -> CULLED"):
        layer.cull(0)
    layer.germinate(0, Residual(16), "residual")
    with pytest.raises(IllegalTransition, match="GERMINATED -> GERMINATED"):
        layer.germinate(0, Residual(16), "residual")
    with pytest.raises(IndexError, match="slot 5"):
        layer.germinate(5, Residual(16))


def test_full_lifecycle_and_embargo_counts_steps():
    layer = two_layer(blend_steps=4, embargo_steps=3)[0]
    layer.germinate(0, Residual(16), "residual")
    assert layer.advance(0) == S.TRAINING
    assert layer.advance(0) == S.BLENDING
    for _ in range(4):
        layer.step_seeds()
    assert layer.slots[0].state == S.PROBATION and layer.slots[0].alpha == 1.0
    assert layer.advance(0) == S.FOSSILIZED
    # A culled seed is embargoed for exactly embargo_steps steps, then dormant.
    layer.germinate(1, Residual(16), "residual")
    layer.cull(1)
    assert layer.slots[1].state == S.CULLED and "1" not in layer.kernels
    layer.step_seeds()
    assert layer.slots[1].state == S.EMBARGOED
    for _ in range(2):
        layer.step_seeds()
        assert layer.slots[1].state == S.EMBARGOED
    layer.step_seeds()
    assert layer.slots[1].state == S.DORMANT
    events, _ = layer.drain()
    moves = [(e["from"], e["to"]) for e in events if e["slot"] == 1]
    assert moves == [
        ("DORMANT", "GERMINATED"),
        ("GERMINATED", "CULLED"),
        ("CULLED", "EMBARGOED"),
        ("EMBARGOED", "DORMANT"),
    ]


# ---------------------------------------------------------- gradient isolation
def test_training_seed_leaves_host_output_and_gradients_exactly_unchanged():
    model = two_layer(seed=1)
    plain = copy.deepcopy(model)
    # A kernel with a large non-zero output: isolation must hold regardless of what it returns.
    kernel = Residual(16, zero=False, seed=3)
    model[0].germinate(0, kernel, "residual")
    model[0].advance(0)
    assert model[0].slots[0].state == S.TRAINING
    x = torch.randn(64, 2)
    y = torch.randn(64, 1)
    out, ref = model(x), plain(x)
    assert torch.equal(out, ref)
    nn.functional.mse_loss(out, y).backward()
    nn.functional.mse_loss(ref, y).backward()
    for (name, p), (_, q) in zip(
        [(n, p) for n, p in model.named_parameters() if "host" in n],
        [(n, p) for n, p in plain.named_parameters() if "host" in n],
    ):
        assert torch.equal(p.grad, q.grad), name
    seed_grads = [p.grad for p in kernel.parameters()]
    assert all(g is not None for g in seed_grads)
    assert sum(float(g.abs().sum()) for g in seed_grads) > 0
    assert model[0].slots[0].calls == 1


def sine_fit(straight_through: bool = False, steps: int = 400):
    """y = sin(3x) through a host that is a single linear map, which cannot fit it; a residual
    MLP seed on its output can. Returns (seed task loss at alpha 1 before, after, host floor,
    fit losses)."""
    torch.manual_seed(0)
    layer = KasminaLayer(nn.Linear(1, 1), 1, "only", SeedConfig(lr=3e-3))
    if straight_through:
        fit_delta = layer._seed_delta
        layer._seed_delta = lambda slot, h: (
            _straight_through(layer, slot, h) if slot.alpha_override is None else fit_delta(slot, h)
        )
    host_opt = torch.optim.Adam(layer.host.parameters(), lr=1e-2)
    x = torch.linspace(-2, 2, 256).unsqueeze(1)
    y = torch.sin(3 * x)
    layer.germinate(0, Residual(1, hidden=64), "residual")
    layer.advance(0)

    def seed_loss() -> float:
        with torch.no_grad(), layer.seed_override(0, 1.0):
            return float(nn.functional.mse_loss(layer(x), y))

    before = seed_loss()
    host_losses, fit_losses = [], []
    for _ in range(steps):
        loss = nn.functional.mse_loss(layer(x), y)
        host_losses.append(float(loss.detach()))
        host_opt.zero_grad()
        loss.backward()
        if layer.slots[0].fit_loss:
            fit_losses.append(float(layer.slots[0].fit_loss[0]))
        host_opt.step()
        layer.step_seeds()
    return before, seed_loss(), min(host_losses), fit_losses


def _straight_through(layer, slot, h):
    s = layer.kernels[str(slot.index)](h.detach())
    return s - s.detach(), 1.0


def test_training_seed_loss_falls_on_a_task_the_host_cannot_fit():
    before, after, host_floor, fit = sine_fit()
    assert after < 0.5 * before, (before, after)
    assert after < 0.5 * host_floor, (after, host_floor)  # the seed adds what the host cannot
    assert len(fit) == 400 and sum(fit[-20:]) / 20 < 0.5 * sum(fit[:20]) / 20


def test_plain_straight_through_diverges_which_is_why_training_fits_a_target():
    before, after, _, _ = sine_fit(straight_through=True)
    assert after > 10 * before


# ----------------------------------------------------------------- blending
@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_blending_ramps_alpha_over_k_steps(schedule):
    k = 8
    layer = two_layer(blend_steps=k, blend_schedule=schedule)[0]
    kernel = Residual(16, zero=False)
    layer.germinate(0, kernel, "residual")
    layer.advance(0)
    layer.advance(0)
    alphas = []
    x = torch.randn(5, 2)
    for t in range(1, k + 1):
        layer.step_seeds()
        alphas.append(layer.slots[0].alpha)
        expected = blend_alpha(t, k, schedule)
        h = layer.host(x)
        with torch.no_grad():
            assert torch.allclose(layer(x), h + expected * kernel(h), atol=1e-6)
    assert alphas == pytest.approx([blend_alpha(t, k, schedule) for t in range(1, k + 1)])
    assert all(b > a for a, b in itertools.pairwise(alphas))
    if schedule == "cosine":
        assert alphas[0] < 1 / k  # cosine starts slower than linear
    assert layer.slots[0].state == S.PROBATION and alphas[-1] == 1.0


def test_fossilized_seed_stays_at_alpha_one():
    layer = two_layer(blend_steps=2)[0]
    kernel = Residual(16, zero=False)
    to_state(layer, 0, S.FOSSILIZED, kernel)
    for _ in range(10):
        layer.step_seeds()
    x = torch.randn(4, 2)
    h = layer.host(x)
    assert layer.slots[0].state == S.FOSSILIZED and layer.slots[0].alpha == 1.0
    with torch.no_grad():
        assert torch.allclose(layer(x), h + kernel(h), atol=1e-6)


def test_residual_kernel_starts_as_identity_even_when_blended_in():
    layer = two_layer(blend_steps=2)[0]
    to_state(layer, 0, S.PROBATION, Residual(16, zero=True))
    x = torch.randn(4, 2)
    with torch.no_grad():
        assert torch.equal(layer(x), layer.host(x))


# ------------------------------------------------------------- fast path
def test_dormant_layer_is_a_plain_host_call():
    layer = two_layer()[0]
    calls = []
    host_forward = layer.host.forward
    layer.host.forward = lambda x: calls.append(1) or host_forward(x)
    x = torch.randn(8, 2)
    assert torch.equal(layer(x), host_forward(x))
    assert len(calls) == 1 and layer._stats is None and layer._running == ()
    # A germinated (not yet running) seed does not leave the fast path either.
    layer.germinate(0, Residual(16), "residual")
    layer(x)
    assert layer._running == () and layer.slots[0].calls == 0


# ------------------------------------------------------------------ telemetry
def test_health_signal_is_measured_from_the_recorded_pass():
    torch.manual_seed(0)
    layer = KasminaLayer(nn.Linear(4, 6), 1, "probe")
    with torch.no_grad():
        layer.host.bias[:3] = -1e3  # three units can never be positive: dead
    x = torch.randn(32, 4)
    layer.record = True
    out = layer(x)
    out.pow(2).sum().backward()
    layer.capture_grad()
    sig = layer.health()
    assert sig.dead_ratio == pytest.approx(0.5)
    assert sig.act_mean == pytest.approx(float(out.detach().mean()), rel=1e-5)
    assert sig.act_var == pytest.approx(float(out.detach().var(unbiased=False)), rel=1e-5)
    grad = torch.cat([layer.host.weight.grad.flatten(), layer.host.bias.grad.flatten()])
    assert sig.grad_norm == pytest.approx(float(grad.norm()), rel=1e-5)
    assert sig.weight_norm == pytest.approx(float(layer.host.weight.detach().norm()), rel=1e-5)
    assert sig.latency_ms > 0
    assert sig.params == 4 * 6 + 6 and (sig.fan_in, sig.fan_out) == (4, 6)
    assert sig.slots[0].state == int(S.DORMANT)


def test_conv_activation_stats_count_dead_channels():
    h = torch.randn(2, 4, 3, 3).abs()
    h[:, 1] = -1.0
    mean, _var, dead = activation_stats(h).tolist()
    assert dead == pytest.approx(0.25) and mean == pytest.approx(float(h.mean()), rel=1e-5)


def test_seed_override_measures_contribution_without_changing_state():
    layer = two_layer()[0]
    kernel = Residual(16, zero=False)
    layer.germinate(0, kernel, "residual")
    layer.advance(0)  # TRAINING: forward value is the host's
    x = torch.randn(3, 2)
    with torch.no_grad():
        h = layer.host(x)
        with layer.seed_override(0, 1.0):
            on = layer(x)
        assert torch.allclose(on, h + kernel(h), atol=1e-6)
        assert torch.equal(layer(x), h)
    assert layer.slots[0].state == S.TRAINING and layer.slots[0].alpha_override is None


# --------------------------------------------------------------------- faults
class Raises(nn.Module):
    def forward(self, x):
        raise RuntimeError("boom")


class Nan(nn.Module):
    def forward(self, x):
        return x * float("nan")


class WrongShape(nn.Module):
    def forward(self, x):
        return torch.cat([x, x[:, :1]], 1)


class Slow(nn.Module):
    def forward(self, x):
        time.sleep(0.02)
        return x * 0


class NanGrad(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(16))

    def forward(self, x):
        # Finite forward value, NaN gradient: sqrt at 0 of a negative-zero-shifted input.
        return x * 0 + torch.sqrt(self.w - self.w.detach()) * 0


class OtherDevice(nn.Module):
    def forward(self, x):
        return torch.zeros_like(x, device="meta")  # right shape and dtype, wrong device


@pytest.mark.parametrize(
    ("kernel", "kind"),
    [
        (Raises(), "exception"),
        (Nan(), "nonfinite"),
        (WrongShape(), "shape"),
        (Slow(), "slow"),
        (Float64Delta(), "dtype"),
        (OtherDevice(), "device"),
    ],
)
def test_each_fault_falls_back_records_and_trips_the_breaker(kernel, kind):
    model = two_layer(seed=2, max_faults=3, latency_budget_ms=5.0, blend_steps=1)
    plain = copy.deepcopy(model)
    layer = model[0]
    to_state(layer, 0, S.PROBATION, kernel)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = torch.randn(32, 2), torch.randn(32, 1)
    for i in range(3):
        out = model(x)
        if kind != "slow":  # host path: identical output
            assert torch.equal(out, plain(x))
        loss = nn.functional.mse_loss(out, y)
        assert torch.isfinite(loss)
        opt.zero_grad()
        loss.backward()
        opt.step()
        plain.load_state_dict(model.state_dict(), strict=False)
        if i < 2:
            assert layer.slots[0].state == S.PROBATION
        layer.step_seeds()
    assert layer.slots[0].state == S.EMBARGOED
    events, faults = layer.drain()
    assert [f.kind for f in faults] == [kind] * 3
    assert all(torch.isfinite(p).all() and p.dtype == torch.float32 for p in model.parameters())
    assert faults[0].layer == "l0" and faults[0].slot == 0
    assert any("circuit breaker" in e["reason"] for e in events)


def test_nonfinite_gradient_is_caught_before_the_step():
    layer = two_layer(blend_steps=1, max_faults=1)[0]
    kernel = NanGrad()
    to_state(layer, 0, S.PROBATION, kernel)
    w_before = kernel.w.detach().clone()
    layer(torch.randn(4, 2)).sum().backward()
    assert not torch.isfinite(kernel.w.grad).all()
    layer.step_seeds()
    assert torch.equal(kernel.w.detach(), w_before)
    _, faults = layer.drain()
    assert [f.kind for f in faults] == ["nonfinite_grad"]
    assert layer.slots[0].state == S.CULLED


def test_seed_config_rejects_bad_values():
    with pytest.raises(ValueError, match="blend_schedule='step'"):
        SeedConfig(blend_schedule="step")
    with pytest.raises(ValueError, match="blend_steps must be >= 1, got 0"):
        SeedConfig(blend_steps=0)
    with pytest.raises(ValueError, match="Conv2d, got Conv1d"):
        KasminaLayer(nn.Conv1d(1, 1, 1))


def test_wrong_dtype_message_names_both_dtypes():
    layer = two_layer(blend_steps=1)[0]
    to_state(layer, 0, S.PROBATION, Float64Delta())
    out = layer(torch.randn(4, 2))
    assert out.dtype == torch.float32
    _, faults = layer.drain()
    assert faults[0].message == "expected output dtype torch.float32, got torch.float64"
