"""Sample-level DP-SGD: clipping per case, the configured noise, the accountant against an
independent dp-accounting computation, the site's budget, and a DP round of the real trainer."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from neurofed.edge_node.privacy import BudgetSpent, DPStep, PrivateStep, SiteAccountant, epsilon, solve_noise
from neurofed.edge_node.training import LocalTrainer, TrainConfig, TrainingError
from neurofed.models.config import ModelConfig
from neurofed.models.privacy import DPConfig, PrivacyConfigError, sampling_plan
from neurofed.models.unet import build_unet

SIDE = 32


def _tiny(**kw) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_unet(ModelConfig(channels=(4, 8, 16), strides=(2, 2), num_res_units=1, **kw))


def _crop(seed: int, scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 1, SIDE, SIDE, SIDE, generator=g) * scale
    y = (torch.rand(1, 1, SIDE, SIDE, SIDE, generator=g) > 0.7).float()
    return x, y


def _loss(scale: float):
    from monai.losses import DiceCELoss

    fn = DiceCELoss(sigmoid=True)
    return lambda out, y: scale * fn(out, y)


def _flat(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1).clone() for p in model.parameters()])


def _sgd_step(model, chunks, loss_scale, *, clip, sigma, expected=1.0, generator=None) -> torch.Tensor:
    """The parameter change of one DP-SGD step with plain SGD at rate 1: -(sum of clipped
    per-sample gradients + noise) / expected batch size."""
    before = _flat(model)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    private = PrivateStep(
        model, opt, DPStep(sigma, clip, 1.0, 1), expected_batch_size=expected, generator=generator
    )
    try:
        private.step(chunks, _loss(loss_scale))
    finally:
        private.close()
    return _flat(model) - before


@pytest.mark.parametrize("act", ["prelu", "leakyrelu"])
def test_each_cases_gradient_is_clipped_to_the_bound(act):
    """One case per step, no noise: the step is that case's clipped gradient, never longer than
    the clip. Without clipping the same gradient is tens of times longer (checked, so the test
    fails if per-sample clipping were skipped)."""
    clip = 0.5
    for seed in range(3):
        model = _tiny(act=act)
        x, y = _crop(seed)
        raw = torch.autograd.grad(_loss(100.0)(model(x), y), list(model.parameters()))
        raw_norm = float(torch.cat([g.reshape(-1) for g in raw]).norm())
        assert raw_norm > 20 * clip  # the bound has work to do
        step = _sgd_step(model, [(x, y)], 100.0, clip=clip, sigma=0.0)
        assert float(step.norm()) <= clip * (1 + 1e-4)
        assert float(step.norm()) == pytest.approx(clip, rel=1e-3)  # clipped, not vanished


def test_clipping_is_per_case_not_per_batch():
    """Two cases in one batch and in two physical chunks: each contributes at most the clip, so the
    step (divided by the expected batch of 2) is at most the clip, and chunking changes nothing."""
    clip = 0.5
    a, b = _crop(1), _crop(2)
    together = _sgd_step(
        _tiny(), [(torch.cat([a[0], b[0]]), torch.cat([a[1], b[1]]))], 100.0, clip=clip, sigma=0, expected=2
    )
    chunked = _sgd_step(_tiny(), [a, b], 100.0, clip=clip, sigma=0.0, expected=2)
    assert float(together.norm()) <= clip * (1 + 1e-4)
    torch.testing.assert_close(together, chunked, rtol=1e-3, atol=1e-6)


def test_noise_on_a_zero_update_has_the_configured_std():
    """A step that sampled nobody is noise alone: its std per coordinate is sigma * clip / the
    expected batch size (within 5 %); without DP the same step would not move the weights."""
    clip, sigma, expected = 0.7, 1.3, 2.0
    model = _tiny()
    step = _sgd_step(model, [], 1.0, clip=clip, sigma=sigma, expected=expected)
    want = sigma * clip / expected
    assert step.numel() > 5_000  # the std of 5,000 draws is within 2 % of the truth
    assert float(step.std()) == pytest.approx(want, rel=0.05)
    assert abs(float(step.mean())) < 5 * want / math.sqrt(step.numel())


def test_noise_is_secret_not_the_training_seed():
    """The same torch seed gives different noise: the noise generator is seeded from the OS."""
    steps = []
    for _ in range(2):
        torch.manual_seed(0)
        steps.append(_sgd_step(_tiny(), [], 1.0, clip=1.0, sigma=1.0))
    assert not torch.equal(steps[0], steps[1])


def test_batchnorm_is_refused_under_dp():
    model = _tiny(norm="batch")
    with pytest.raises(TrainingError, match="DP-SGD"):
        PrivateStep(
            model,
            torch.optim.SGD(model.parameters(), lr=1.0),
            DPStep(1.0, 1.0, 0.5, 1),
            expected_batch_size=1,
        )


@pytest.mark.parametrize(
    ("q", "sigma", "steps"), [(0.01, 1.1, 1000), (0.25, 0.8, 40), (0.2, 2.0, 300), (1.0, 5.0, 10)]
)
def test_epsilon_matches_dp_accounting_rdp(q, sigma, steps):
    """The kit's epsilon (Opacus's RDP accountant) against Google's dp-accounting RDP accountant
    for the same Poisson-sampled Gaussian: within 1 %."""
    from dp_accounting import GaussianDpEvent, PoissonSampledDpEvent, SelfComposedDpEvent
    from dp_accounting.rdp import RdpAccountant
    from opacus.accountants.rdp import RDPAccountant

    delta = 1e-5
    orders = RDPAccountant.DEFAULT_ALPHAS
    ref = RdpAccountant(orders=orders)
    ref.compose(SelfComposedDpEvent(PoissonSampledDpEvent(q, GaussianDpEvent(sigma)), steps))
    # the kit splits the steps over rounds: composition must not change the figure
    kit = epsilon([(sigma, q, steps // 2), (sigma, q, steps - steps // 2)], delta)
    assert kit == pytest.approx(ref.get_epsilon(delta), rel=0.01)


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_a_200_round_ledger_is_accounted_as_one_composition_per_noise(accountant):
    """A site's ledger grows by one stretch a round. 200 rounds of one DP-SGD step at a small
    site's rate (0.33, noise 4.35) and a later stretch at other noise reach the accountant as
    two compositions, and the epsilon is dp-accounting's for all 203 steps (RDP against RDP, PRV
    against PLD, within 1 %). Handed over stretch by stretch, Opacus's RDP took about 50 s per
    epsilon at round 200, twice a round at every site."""
    from dp_accounting import GaussianDpEvent, PoissonSampledDpEvent, SelfComposedDpEvent
    from dp_accounting.pld import PLDAccountant
    from dp_accounting.rdp import RdpAccountant
    from opacus.accountants.rdp import RDPAccountant

    from neurofed.edge_node.privacy import merged_history

    history = [(4.35, 0.33, 1)] * 200 + [(2.0, 0.33, 3), (4.35, 0.33, 0)]
    assert merged_history(history) == [(4.35, 0.33, 200), (2.0, 0.33, 3)]
    ref = RdpAccountant(orders=RDPAccountant.DEFAULT_ALPHAS) if accountant == "rdp" else PLDAccountant()
    ref.compose(SelfComposedDpEvent(PoissonSampledDpEvent(0.33, GaussianDpEvent(4.35)), 200))
    ref.compose(SelfComposedDpEvent(PoissonSampledDpEvent(0.33, GaussianDpEvent(2.0)), 3))
    assert epsilon(history, 1e-5, accountant) == pytest.approx(ref.get_epsilon(1e-5), rel=0.01)


@pytest.mark.parametrize(("q", "sigma", "steps"), [(0.2, 2.0, 300), (1.0, 5.0, 10)])
def test_prv_epsilon_matches_dp_accounting_pld(q, sigma, steps):
    """The kit's PRV epsilon (Opacus's PRV accountant) against Google's dp-accounting PLD
    accountant for the same Poisson-sampled Gaussian: within 1 %; both tighter than RDP."""
    from dp_accounting import GaussianDpEvent, PoissonSampledDpEvent, SelfComposedDpEvent
    from dp_accounting.pld import PLDAccountant

    delta = 1e-5
    ref = PLDAccountant(value_discretization_interval=1e-4)
    ref.compose(SelfComposedDpEvent(PoissonSampledDpEvent(q, GaussianDpEvent(sigma)), steps))
    kit = epsilon([(sigma, q, steps // 2), (sigma, q, steps - steps // 2)], delta, "prv")
    assert kit == pytest.approx(ref.get_epsilon(delta), rel=0.01)
    assert kit < epsilon([(sigma, q, steps)], delta, "rdp")


def test_a_site_with_the_prv_accountant_reports_its_tighter_epsilon():
    """The task's accountant reaches the site's ledger: the same steps, a smaller epsilon."""
    spent = {}
    for acc in ("rdp", "prv"):
        cfg = DPConfig(accountant=acc, noise_multiplier=1.0, delta=1e-5, rounds=3)
        a = SiteAccountant({})
        a.charge(a.plan(cfg, 40, 4, 1))
        report = a.report(cfg)
        assert report["accountant"] == acc
        spent[acc] = report["epsilon"]
        assert spent[acc] == pytest.approx(epsilon([(1.0, 0.1, 10)], 1e-5, acc))
    assert spent["prv"] < spent["rdp"]


def test_site_accountant_solves_its_noise_and_stops_at_its_budget():
    cfg = DPConfig(target_epsilon=4.0, delta=1e-5, rounds=3, max_grad_norm=1.0)
    state: dict = {}
    acc = SiteAccountant(state)
    q, steps = sampling_plan(num_cases=40, batch_size=4, epochs=1)
    assert (q, steps) == (0.1, 10)
    for _ in range(cfg.rounds):
        step = acc.plan(cfg, 40, 4, 1)
        acc.charge(step)
    assert step.noise_multiplier == pytest.approx(solve_noise(4.0, 1e-5, 0.1, 30))
    spent = acc.epsilon(cfg.delta)
    assert 3.9 < spent <= 4.0
    with pytest.raises(BudgetSpent, match="budget spent"):
        acc.plan(cfg, 40, 4, 1)  # a fourth round (a coordinator resumed with more rounds)
    assert state["spent"] is True and SiteAccountant(state).steps == 30  # nothing charged for it
    report = acc.report(cfg)
    assert report["epsilon"] == pytest.approx(spent) and report["steps"] == 30
    assert report["sample_rate"] == 0.1 and report["accountant"] == "rdp"


def test_dp_settings_are_checked():
    with pytest.raises(PrivacyConfigError, match="noise-multiplier or --dp-target-epsilon"):
        DPConfig(max_grad_norm=1.0)
    with pytest.raises(PrivacyConfigError, match="dp-delta"):
        DPConfig(noise_multiplier=1.0, delta=2.0)
    cfg = DPConfig(noise_multiplier=1.0, rounds=2)
    assert DPConfig.from_task(cfg.to_task()) == cfg and DPConfig.from_task(None) is None
    with pytest.raises(PrivacyConfigError):
        DPConfig.from_task({"max_grad_norm": -1, "noise_multiplier": 1.0})


@pytest.mark.slow
def test_a_dp_round_of_the_site_trainer(synth_data: Path, synth_tiny_config) -> None:
    """LocalTrainer with dp: the planned number of steps, finite loss, weights that moved, and
    the same model evaluates afterwards (Opacus's hooks removed)."""
    trainer = LocalTrainer(synth_data / "site-01", synth_tiny_config, TrainConfig(batch_size=2), device="cpu")
    q, steps = sampling_plan(trainer.num_train_cases, 2, 1)
    start = {k: v.clone() for k, v in trainer.model().state_dict().items()}
    res = trainer.train(start, 1, dp=DPStep(1.0, 1.0, q, steps))
    assert res.steps == steps and math.isfinite(res.loss)
    assert res.state_dict.keys() == start.keys()
    assert any(not torch.equal(res.state_dict[k], start[k]) for k in start)
    assert not any(
        hasattr(p, "grad_sample") and p.grad_sample is not None for p in trainer.model().parameters()
    )
    assert trainer.evaluate(res.state_dict, split="val").num_cases >= 0
    with pytest.raises(TrainingError, match="FedProx"):
        trainer.train(start, 1, prox_mu=0.01, dp=DPStep(1.0, 1.0, q, steps))
