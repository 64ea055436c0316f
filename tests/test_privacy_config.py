"""Tests for lightning_colearn.privacy: the two privacy configurations and the Opacus helpers.

Every validation message is matched; the accounting helpers are compared with Opacus' own accountants
fed the same (noise multiplier, sample rate, steps) directly. PRV accounting is slow for long histories:
the PRV cases here keep to a few hundred steps.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import re

import pytest
import torch
from torch import nn

pytest.importorskip("opacus")

from omegaconf import OmegaConf
from opacus.accountants import GaussianAccountant, PRVAccountant, RDPAccountant
from opacus.layers import DPLSTM

from lightning_colearn.privacy import (
    FederatedPrivacy,
    PrivacyConfig,
    check_model,
    epsilon,
    epsilon_after,
    make_accountant,
    noise_for_target,
)

pytestmark = pytest.mark.filterwarnings("ignore:GDP accounting is experimental")

OPACUS = {"rdp": RDPAccountant, "prv": PRVAccountant, "gdp": GaussianAccountant}


# ------------------------------------------------------------- PrivacyConfig
def test_defaults_and_normalised_numbers():
    config = PrivacyConfig(noise_multiplier=1)
    assert config == PrivacyConfig(noise_multiplier=1.0, max_grad_norm=1.0, target_epsilon=None, delta=1e-5, epochs=None,
                                   accountant="rdp", poisson_sampling=True, fix_model=False, secure_mode=False)
    assert isinstance(config.noise_multiplier, float)
    both = PrivacyConfig(noise_multiplier=0.9, target_epsilon=4.0)  # the noise, and a budget to stop at
    assert (both.noise_multiplier, both.target_epsilon) == (0.9, 4.0)
    assert PrivacyConfig(target_epsilon=2, epochs=3).epochs == 3
    assert PrivacyConfig(noise_multiplier=1.0, delta=None).delta is None  # noise without a reported epsilon


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"noise_multiplier": 0}, "privacy.noise_multiplier must be a finite number > 0 or None, got 0"),
        ({"noise_multiplier": -1.0}, "privacy.noise_multiplier must be a finite number > 0 or None, got -1.0"),
        ({"noise_multiplier": math.nan}, "privacy.noise_multiplier must be a finite number > 0 or None, got nan"),
        ({"noise_multiplier": math.inf}, "privacy.noise_multiplier must be a finite number > 0 or None, got inf"),
        ({"noise_multiplier": "1.0"}, "privacy.noise_multiplier must be a finite number > 0 or None, got '1.0'"),
        ({"noise_multiplier": True}, "privacy.noise_multiplier must be a finite number > 0 or None, got True"),
        ({"noise_multiplier": 1.0, "max_grad_norm": 0}, "privacy.max_grad_norm must be a finite number > 0, got 0"),
        ({"noise_multiplier": 1.0, "max_grad_norm": None}, "privacy.max_grad_norm must be a finite number > 0, got None"),
        ({"target_epsilon": -2.0}, "privacy.target_epsilon must be a finite number > 0 or None, got -2.0"),
        ({"target_epsilon": math.nan}, "privacy.target_epsilon must be a finite number > 0 or None, got nan"),
        ({"noise_multiplier": 1.0, "delta": 1.0}, "privacy.delta must be a number in (0, 1)"),
        ({"noise_multiplier": 1.0, "delta": 2}, "privacy.delta must be a number in (0, 1)"),
        ({"noise_multiplier": 1.0, "delta": 0},
         "privacy.delta must be a number in (0, 1) (usually well below 1 / the number of records), got 0"),
        ({"noise_multiplier": 1.0, "delta": -1e-5}, "privacy.delta must be a number in (0, 1)"),
        ({"noise_multiplier": 1.0, "delta": math.nan}, "privacy.delta must be a number in (0, 1)"),
        ({"target_epsilon": 3.0, "delta": None},
         "privacy.target_epsilon=3.0 needs privacy.delta (ε is only defined at a δ), got delta=None"),
        ({}, ("privacy needs privacy.noise_multiplier (the noise of DP-SGD) or privacy.target_epsilon (the budget the "
              "noise is computed for), got neither")),
        ({"target_epsilon": 3.0, "epochs": 0}, "privacy.epochs must be an int >= 1 or None (the Trainer's max_epochs), got 0"),
        ({"target_epsilon": 3.0, "epochs": 2.5}, "privacy.epochs must be an int >= 1 or None"),
        ({"noise_multiplier": 1.0, "accountant": "moments"},
         "privacy.accountant must be one of 'rdp', 'prv', 'gdp', got 'moments'"),
        ({"noise_multiplier": 1.0, "accountant": None}, "privacy.accountant must be one of 'rdp', 'prv', 'gdp', got None"),
        ({"noise_multiplier": 1.0, "poisson_sampling": "yes"}, "privacy.poisson_sampling must be true or false, got 'yes'"),
        ({"noise_multiplier": 1.0, "fix_model": 1}, "privacy.fix_model must be true or false, got 1"),
        ({"noise_multiplier": 1.0, "secure_mode": None}, "privacy.secure_mode must be true or false, got None"),
    ],
)
def test_every_bad_field_is_named_with_the_value_seen(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        PrivacyConfig(**kwargs)


def test_every_problem_is_reported_at_once():
    with pytest.raises(ValueError) as info:
        PrivacyConfig(noise_multiplier=0, max_grad_norm=-1, delta=2, accountant="x")
    message = str(info.value)
    assert message.startswith("privacy: 4 problems: ")
    for field in ("noise_multiplier", "max_grad_norm", "delta", "accountant"):
        assert f"privacy.{field} must be" in message


def test_the_config_is_frozen_and_replace_checks_again():
    config = PrivacyConfig(noise_multiplier=1.0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.noise_multiplier = 2.0  # type: ignore[misc]
    assert dataclasses.replace(config, epochs=4).epochs == 4
    with pytest.raises(ValueError, match="privacy.epochs must be an int >= 1"):
        dataclasses.replace(config, epochs=0)


def test_from_any_takes_none_a_config_a_dict_and_a_dictconfig():
    config = PrivacyConfig(noise_multiplier=1.0)
    assert PrivacyConfig.from_any(None) is None
    assert PrivacyConfig.from_any(config) is config
    assert PrivacyConfig.from_any({"noise_multiplier": 1.0}) == config
    hydra = OmegaConf.create({"target_epsilon": 8, "epochs": 2, "accountant": "prv", "fix_model": True})
    assert PrivacyConfig.from_any(hydra) == PrivacyConfig(target_epsilon=8.0, epochs=2, accountant="prv", fix_model=True)


def test_from_any_names_unknown_keys_and_refuses_other_types():
    with pytest.raises(ValueError, match=re.escape("privacy: unknown keys 'sigma', 'max_grad' (did you mean "
                                                   "'max_grad_norm'?); the keys are noise_multiplier, max_grad_norm")):
        PrivacyConfig.from_any({"sigma": 1.0, "max_grad": 1.0})
    with pytest.raises(TypeError, match="privacy must be None, a PrivacyConfig or a mapping of its fields, got float"):
        PrivacyConfig.from_any(1.0)
    with pytest.raises(TypeError, match="got FederatedPrivacy"):
        PrivacyConfig.from_any(FederatedPrivacy(noise_multiplier=1.0))
    with pytest.raises(ValueError, match="privacy.noise_multiplier must be a finite number > 0 or None, got 0"):
        PrivacyConfig.from_any({"noise_multiplier": 0})


def test_resolve_noise_multiplier():
    assert PrivacyConfig(noise_multiplier=0.8, target_epsilon=1.0).resolve_noise_multiplier(0.1) == 0.8
    target = PrivacyConfig(target_epsilon=4.0)
    with pytest.raises(ValueError, match="privacy.target_epsilon=4.0 needs the epochs to spend it over"):
        target.resolve_noise_multiplier(0.05)
    sigma = noise_for_target(4.0, 1e-5, 0.02, 3)
    assert target.resolve_noise_multiplier(0.02, max_epochs=3) == sigma
    assert dataclasses.replace(target, epochs=3).resolve_noise_multiplier(0.02, max_epochs=9) == sigma


# ----------------------------------------------------------- FederatedPrivacy
def test_federated_defaults_follow_andrew_et_al():
    dp = FederatedPrivacy(noise_multiplier=1)
    assert (dp.clip_norm, dp.adaptive, dp.target_quantile, dp.clip_learning_rate, dp.count_noise_multiplier, dp.side,
            dp.delta, dp.target_epsilon, dp.accountant) == (1.0, False, 0.5, 0.2, None, "server", 1e-5, None, "rdp")
    assert dp.update_noise_for(3) == 1.0  # no adaptive clipping: the whole budget goes to the updates
    adaptive = dataclasses.replace(dp, adaptive=True)
    assert adaptive.count_noise_for(400) == 20.0  # m / 20
    assert adaptive.count_noise_for(4) == 5.0  # the floor: the count takes at most 1% of the budget
    assert adaptive.update_noise_for(4) == pytest.approx((1 - 0.01) ** -0.5)
    assert adaptive.update_noise_for(400) == pytest.approx((1 - (1 / 40) ** 2) ** -0.5)
    explicit = dataclasses.replace(adaptive, count_noise_multiplier=0.75)
    assert explicit.count_noise_for(1000) == 0.75
    assert explicit.update_noise_for(1000) == pytest.approx((1 - (1 / 1.5) ** 2) ** -0.5)
    with pytest.raises(ValueError, match="the expected number of clients a round must be a finite number > 0, got 0"):
        adaptive.count_noise_for(0)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"noise_multiplier": 0}, "dp.noise_multiplier must be a finite number > 0, got 0"),
        ({"noise_multiplier": math.nan}, "dp.noise_multiplier must be a finite number > 0, got nan"),
        ({"noise_multiplier": None}, "dp.noise_multiplier must be a finite number > 0, got None"),
        ({"clip_norm": -0.1}, "dp.clip_norm must be a finite number > 0, got -0.1"),
        ({"adaptive": "true"}, "dp.adaptive must be true or false, got 'true'"),
        ({"target_quantile": 1.0}, "dp.target_quantile must be a number in (0, 1), got 1.0"),
        ({"target_quantile": 0}, "dp.target_quantile must be a number in (0, 1), got 0"),
        ({"clip_learning_rate": 0.0}, "dp.clip_learning_rate must be a finite number > 0, got 0.0"),
        ({"count_noise_multiplier": -1}, "dp.count_noise_multiplier must be a finite number > 0 or None, got -1"),
        ({"count_noise_multiplier": 0.5}, ("dp.count_noise_multiplier must be > dp.noise_multiplier / 2 = 0.5 for the "
                                           "update noise and the count noise to fit in a budget of noise multiplier 1 "
                                           "(Andrew et al. 2021), got 0.5")),
        ({"side": "both"}, "dp.side must be one of 'server', 'client', got 'both'"),
        ({"delta": 1}, "dp.delta must be a number in (0, 1)"),
        ({"delta": 0.0}, "dp.delta must be a number in (0, 1)"),
        ({"target_epsilon": 0}, "dp.target_epsilon must be a finite number > 0 or None, got 0"),
        ({"target_epsilon": 2.0, "delta": None},
         "dp.target_epsilon=2.0 needs dp.delta (ε is only defined at a δ), got delta=None"),
        ({"accountant": "RDP"}, "dp.accountant must be one of 'rdp', 'prv', 'gdp', got 'RDP'"),
    ],
)
def test_every_bad_federated_field_is_named(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        FederatedPrivacy(**{"noise_multiplier": 1.0, **kwargs})


def test_federated_from_any():
    dp = FederatedPrivacy(noise_multiplier=1.0, adaptive=True)
    assert FederatedPrivacy.from_any(None) is None and FederatedPrivacy.from_any(dp) is dp
    assert FederatedPrivacy.from_any(OmegaConf.create({"noise_multiplier": 1, "adaptive": True})) == dp
    with pytest.raises(ValueError, match=re.escape("dp: unknown key 'quantile' (did you mean 'target_quantile'?)")):
        FederatedPrivacy.from_any({"noise_multiplier": 1.0, "quantile": 0.5})
    with pytest.raises(ValueError, match=re.escape("dp: dp.noise_multiplier is required")):
        FederatedPrivacy.from_any({"clip_norm": 0.5})
    with pytest.raises(TypeError, match="dp must be None, a FederatedPrivacy or a mapping of its fields, got PrivacyConfig"):
        FederatedPrivacy.from_any(PrivacyConfig(noise_multiplier=1.0))


# ---------------------------------------------------------------- accounting
@pytest.mark.parametrize("name", ["rdp", "prv", "gdp"])
def test_make_accountant_and_epsilon_before_any_step(name):
    accountant = make_accountant(name)
    assert type(accountant) is OPACUS[name] and accountant.history == []
    assert epsilon(accountant, 1e-5) == 0.0


def test_make_accountant_and_epsilon_name_bad_arguments():
    with pytest.raises(ValueError, match=re.escape("privacy.accountant must be one of 'rdp', 'prv', 'gdp', got 'moments'")):
        make_accountant("moments")
    for bad in (0, 1, None, math.nan):
        with pytest.raises(ValueError, match=re.escape(f"privacy.delta must be a number in (0, 1) to report an epsilon, "
                                                       f"got {bad!r}")):
            epsilon(make_accountant("rdp"), bad)
    with pytest.raises(TypeError, match="expected an Opacus accountant"):
        epsilon(object(), 1e-5)


@pytest.mark.parametrize("name,steps", [("rdp", 500), ("prv", 200)])
def test_epsilon_equals_opacus_fed_the_same_history(name, steps):
    sigma, q, delta = 1.1, 0.02, 1e-5
    accountant = make_accountant(name)
    for _ in range(steps):
        accountant.step(noise_multiplier=sigma, sample_rate=q)
    direct = OPACUS[name]()
    direct.history = [(sigma, q, steps)]
    assert epsilon(accountant, delta) == direct.get_epsilon(delta=delta)
    assert epsilon(accountant, delta) > 0


@pytest.mark.parametrize("name", ["rdp", "prv", "gdp"])
def test_epsilon_after_leaves_the_accountant_alone_and_equals_stepping_a_copy(name):
    accountant = make_accountant(name)
    for _ in range(30):
        accountant.step(noise_multiplier=1.0, sample_rate=0.05)
    before = copy.deepcopy(accountant.history)
    after = epsilon_after(accountant, 1e-5, noise_multiplier=1.0, sample_rate=0.05, steps=40)
    assert accountant.history == before
    stepped = copy.deepcopy(accountant)
    for _ in range(40):
        stepped.step(noise_multiplier=1.0, sample_rate=0.05)
    assert after == epsilon(stepped, 1e-5) > epsilon(accountant, 1e-5)
    assert epsilon_after(accountant, 1e-5, noise_multiplier=1.0, sample_rate=0.05, steps=0) == epsilon(accountant, 1e-5)


@pytest.mark.parametrize("name", ["rdp", "prv"])
def test_epsilon_after_a_change_of_noise_or_rate_equals_stepping_a_copy(name):
    accountant = make_accountant(name)
    for _ in range(20):
        accountant.step(noise_multiplier=1.0, sample_rate=0.05)
    before = copy.deepcopy(accountant.history)
    after = epsilon_after(accountant, 1e-5, noise_multiplier=0.8, sample_rate=0.1, steps=15)
    stepped = copy.deepcopy(accountant)
    for _ in range(15):
        stepped.step(noise_multiplier=0.8, sample_rate=0.1)
    assert accountant.history == before and stepped.history == [(1.0, 0.05, 20), (0.8, 0.1, 15)]
    assert after == epsilon(stepped, 1e-5)
    fresh = make_accountant(name)
    assert epsilon_after(fresh, 1e-5, noise_multiplier=0.8, sample_rate=0.1, steps=15) == epsilon(
        _fed(name, [(0.8, 0.1, 15)]), 1e-5)


def _fed(name, history):
    accountant = OPACUS[name]()
    accountant.history = list(history)
    return accountant


def test_epsilon_after_names_bad_arguments():
    accountant = make_accountant("rdp")
    kwargs = {"noise_multiplier": 1.0, "sample_rate": 0.1, "steps": 3}
    cases = [("noise_multiplier", 0, "a finite number > 0"), ("noise_multiplier", math.inf, "a finite number > 0"),
             ("sample_rate", 0, "a number in (0, 1]"), ("sample_rate", 1.5, "a number in (0, 1]"),
             ("steps", -1, "an int >= 0"), ("steps", 2.0, "an int >= 0")]
    for field, bad, allowed in cases:
        with pytest.raises(ValueError, match=re.escape(f"privacy.{field} must be {allowed}, got {bad!r}")):
            epsilon_after(accountant, 1e-5, **{**kwargs, field: bad})
    gdp = make_accountant("gdp")
    gdp.step(noise_multiplier=1.0, sample_rate=0.1)
    with pytest.raises(ValueError, match="privacy.accountant 'gdp' composes one constant noise multiplier and sample rate"):
        epsilon_after(gdp, 1e-5, noise_multiplier=2.0, sample_rate=0.1, steps=1)


def test_noise_for_target_reaches_the_target_within_opacus_tolerance():
    target, delta, q, epochs = 2.0, 1e-5, 0.02, 3
    sigma = noise_for_target(target, delta, q, epochs)
    spent = epsilon(_fed("rdp", [(sigma, q, int(epochs / q))]), delta)
    assert target - 0.01 <= spent <= target
    looser = noise_for_target(target, delta, q, epochs, epsilon_tolerance=0.5)
    assert target - 0.5 <= epsilon(_fed("rdp", [(looser, q, int(epochs / q))]), delta) <= target


def test_noise_for_target_with_prv_on_a_short_run():
    sigma = noise_for_target(4.0, 1e-5, 0.02, 1, "prv", epsilon_tolerance=0.1)  # PRV's bisection is slow: a loose one
    assert 4.0 - 0.1 <= epsilon(_fed("prv", [(sigma, 0.02, 50)]), 1e-5) <= 4.0


def test_noise_for_target_names_bad_arguments_and_unreachable_targets():
    with pytest.raises(ValueError, match=re.escape("privacy.target_epsilon=1e-09 cannot be reached at delta=1e-05 over 5 "
                                                   "epochs of sample rate 1.0 (5 steps) with any noise multiplier")):
        noise_for_target(1e-9, 1e-5, 1.0, 5)
    cases = [((0, 1e-5, 0.1, 1), "privacy.target_epsilon must be a finite number > 0, got 0"),
             ((1.0, 1.0, 0.1, 1), "privacy.delta must be a number in (0, 1), got 1.0"),
             ((1.0, 1e-5, 0.0, 1), "privacy.sample_rate must be a number in (0, 1], got 0.0"),
             ((1.0, 1e-5, 0.1, 0), "privacy.epochs must be an int >= 1, got 0"),
             ((1.0, 1e-5, 0.1, 1, "moments"), "privacy.accountant must be one of 'rdp', 'prv', 'gdp', got 'moments'")]
    for args, message in cases:
        with pytest.raises(ValueError, match=re.escape(message)):
            noise_for_target(*args)
    with pytest.raises(ValueError, match="epsilon_tolerance must be a finite number > 0, got 0"):
        noise_for_target(1.0, 1e-5, 0.1, 1, epsilon_tolerance=0)


# --------------------------------------------------------------------- layers
class _Net(nn.Module):
    def __init__(self, **bn) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4, **bn), nn.ReLU())
        self.head = nn.Linear(4 * 4 * 4, 3)

    def forward(self, x):
        return self.head(self.features(x).flatten(1))


def test_a_plain_mlp_passes_unchanged():
    mlp = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.LayerNorm(8), nn.Linear(8, 2))
    state = {k: v.clone() for k, v in mlp.state_dict().items()}
    assert check_model(mlp, False) is mlp
    assert check_model(mlp, True) is mlp
    assert all(torch.equal(v, state[k]) for k, v in mlp.state_dict().items())


def test_batchnorm_is_named_by_its_path_and_fix_replaces_it_with_groupnorm():
    net = _Net()
    with pytest.raises(ValueError, match=re.escape(
            "privacy: the model has layers DP-SGD cannot train: features.1 (BatchNorm2d: BatchNorm cannot support "
            "training with differential privacy.); pass privacy.fix_model=true to replace them (BatchNorm -> GroupNorm)")):
        check_model(net, False)
    fixed = check_model(net, True)
    assert fixed is not net and isinstance(net.features[1], nn.BatchNorm2d)  # the original is left alone
    assert isinstance(fixed.features[1], nn.GroupNorm) and fixed.features[1].num_groups == 4
    assert fixed(torch.randn(2, 1, 6, 6)).shape == (2, 3)
    assert check_model(fixed, False) is fixed


def test_every_offending_layer_is_listed_and_fix_handles_each_kind():
    model = nn.ModuleDict({"rnn": nn.LSTM(3, 4), "norm": nn.BatchNorm1d(4), "ok": nn.Linear(4, 4)})
    with pytest.raises(ValueError) as info:
        check_model(model, False)
    message = str(info.value)
    assert "rnn (LSTM: We do not support nn.LSTM because its implementation uses special modules.)" in message
    assert "norm (BatchNorm1d: BatchNorm cannot support training with differential privacy.)" in message
    assert "(BatchNorm -> GroupNorm, LSTM -> DPLSTM)" in message
    fixed = check_model(model, True)
    assert isinstance(fixed["rnn"], DPLSTM) and isinstance(fixed["norm"], nn.GroupNorm) and fixed["ok"] is not model["ok"]


@pytest.mark.parametrize("frozen", [False, True])
def test_a_batchnorm_without_trainable_parameters_is_caught_too(frozen):
    # Opacus' ModuleValidator looks at layers with trainable parameters only; a BatchNorm without them still mixes
    # the examples of a batch and keeps running statistics of the private data
    net = _Net(affine=frozen)
    if frozen:
        net.features[1].requires_grad_(False)
    with pytest.raises(ValueError, match=re.escape("features.1 (BatchNorm2d: BatchNorm cannot support training")):
        check_model(net, False)
    fixed = check_model(net, True)
    norm = fixed.features[1]
    assert isinstance(norm, nn.GroupNorm) and norm.affine == frozen
    assert all(not p.requires_grad for p in norm.parameters())  # frozen stays frozen
    assert fixed(torch.randn(2, 1, 6, 6)).shape == (2, 3)


def test_layers_are_judged_in_training_mode_and_the_modes_are_restored():
    mlp = nn.Sequential(nn.Linear(4, 4), nn.Dropout(), nn.Linear(4, 2)).eval()
    mlp[1].train()
    assert check_model(mlp, False) is mlp  # an eval-mode model is not refused for being in eval mode
    assert [m.training for m in mlp.modules()] == [False, False, True, False]
    net = _Net().eval()
    with pytest.raises(ValueError, match="features.1"):
        check_model(net, False)
    assert not any(m.training for m in net.modules())


def test_a_batchnorm_model_itself_and_bad_arguments():
    with pytest.raises(ValueError, match=re.escape("(the model itself) (BatchNorm1d:")):
        check_model(nn.BatchNorm1d(3), False)
    assert isinstance(check_model(nn.BatchNorm1d(3), True), nn.GroupNorm)
    with pytest.raises(TypeError, match="check_model takes an nn.Module, got function"):
        check_model(lambda x: x, False)
    with pytest.raises(TypeError, match="privacy.fix_model must be true or false, got 'yes'"):
        check_model(nn.Linear(2, 2), "yes")
