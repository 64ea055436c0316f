"""Differential privacy settings and the Opacus helpers around them (no Lightning).

Two kinds of privacy, two configurations:

- :class:`PrivacyConfig`: *sample-level* DP-SGD for every member of a cohort
  (Abadi et al., 2016, "Deep Learning with Differential Privacy"): each
  member clips every per-example gradient to ``max_grad_norm`` and adds
  Gaussian noise of standard deviation ``noise_multiplier * max_grad_norm``
  to the sum. Opacus (Yousefpour et al., 2021, "Opacus: User-Friendly
  Differential Privacy Library in PyTorch") computes the per-sample
  gradients, clips, noises and accounts; this module only checks the
  settings and wraps the accountants. Errors name the field as ``privacy.<field>``.
- :class:`FederatedPrivacy`: *user-level* DP-FedAvg over the clients of a
  federated round (McMahan et al., 2018, "Learning Differentially Private
  Recurrent Language Models"), optionally with adaptive clipping (Andrew et
  al., 2021, "Differentially Private Learning with Adaptive Clipping"). The
  math is :mod:`lightning_colearn.functional.privacy`. Errors name the field
  as ``dp.<field>``.

The helpers take Opacus' accountants (RDP: Mironov, 2017, "Rényi
Differential Privacy" with the subsampled Gaussian of Mironov et al., 2019;
PRV: Gopi et al., 2021, "Numerical Composition of Differential Privacy"; GDP:
Dong et al., 2019, "Gaussian Differential Privacy"): :func:`make_accountant`,
:func:`epsilon`, :func:`epsilon_after` (the ε one more epoch or round *would*
reach, so a member stops before it passes its budget) and
:func:`noise_for_target`. :func:`check_model` refuses (or, asked to, fixes)
layers DP-SGD cannot train.

Opacus is the optional extra ``privacy``: the configurations need only the
standard library, the helpers import Opacus when called.

Examples:
    >>> config = PrivacyConfig.from_any({"noise_multiplier": 1.1, "max_grad_norm": 1.0})
    >>> config.noise_multiplier, config.delta, config.accountant
    (1.1, 1e-05, 'rdp')
    >>> accountant = make_accountant(config.accountant)
    >>> epsilon(accountant, config.delta)   # nothing spent before the first step
    0.0
    >>> for _ in range(100):
    ...     accountant.step(noise_multiplier=1.1, sample_rate=0.01)
    >>> now = epsilon(accountant, config.delta)
    >>> then = epsilon_after(accountant, config.delta, noise_multiplier=1.1, sample_rate=0.01, steps=100)
    >>> 0 < now < then, len(accountant.history), accountant.history[-1][2]   # the accountant is left as it was
    (True, 1, 100)
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import numbers
import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from torch import nn

from lightning_colearn._checks import is_int_at_least
from lightning_colearn.functional.privacy import DP_SIDES, split_noise_multiplier

if TYPE_CHECKING:  # Opacus is an extra: imported by the helpers that need it
    from opacus.accountants import IAccountant

__all__ = [
    "ACCOUNTANTS",
    "FederatedPrivacy",
    "PrivacyConfig",
    "check_model",
    "epsilon",
    "epsilon_after",
    "make_accountant",
    "noise_for_target",
]

#: Opacus' accountants by name: Rényi DP, privacy loss random variables, Gaussian DP.
ACCOUNTANTS = ("rdp", "prv", "gdp")


# ----------------------------------------------------------------- validation
def _real(value: object) -> float:
    """``value`` as a float; NaN (which fails every range check) for a bool, a string or a non-number."""
    if isinstance(value, (bool, str, bytes)) or not isinstance(value, numbers.Real):
        return math.nan
    return float(value)


def _check_positive(errors: list[str], name: str, value: object, *, optional: bool = False) -> None:
    if optional and value is None:
        return
    number = _real(value)
    if not (math.isfinite(number) and number > 0):
        errors.append(f"{name} must be a finite number > 0{' or None' if optional else ''}, got {value!r}")


def _check_delta(errors: list[str], name: str, value: object) -> None:
    if value is None:
        return
    number = _real(value)
    if not 0 < number < 1:
        errors.append(f"{name} must be a number in (0, 1) (usually well below 1 / the number of records), got {value!r}")


def _check_bool(errors: list[str], name: str, value: object) -> None:
    if not isinstance(value, bool):
        errors.append(f"{name} must be true or false, got {value!r}")


def _check_choice(errors: list[str], name: str, value: object, choices: tuple[str, ...]) -> None:
    if not (isinstance(value, str) and value in choices):
        errors.append(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")


def _raise(prefix: str, errors: list[str]) -> None:
    if len(errors) == 1:
        raise ValueError(errors[0])
    if errors:
        raise ValueError(f"{prefix}: {len(errors)} problems: " + "; ".join(errors))


def _normalise(config: Any, floats: tuple[str, ...]) -> None:
    """Store the validated numbers as Python floats (numpy scalars and ints from a YAML file become floats)."""
    for name in floats:
        value = getattr(config, name)
        if value is not None:
            object.__setattr__(config, name, float(value))
    if getattr(config, "epochs", None) is not None:
        object.__setattr__(config, "epochs", int(config.epochs))


def _from_any(cls: type, prefix: str, value: object) -> Any:
    """``value`` (None, an instance of ``cls``, or a mapping of its fields) as a ``cls`` or None."""
    if value is None or isinstance(value, cls):
        return value
    if not isinstance(value, Mapping):
        raise TypeError(f"{prefix} must be None, a {cls.__name__} or a mapping of its fields, got {type(value).__name__}")
    fields = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in value if k not in fields]
    if unknown:
        hints = []
        for key in unknown:
            close = difflib.get_close_matches(str(key), fields, n=1)
            hints.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise ValueError(f"{prefix}: unknown key{'s' if len(unknown) > 1 else ''} {', '.join(hints)}; "
                         f"the keys are {', '.join(fields)}")
    missing = [f.name for f in dataclasses.fields(cls)
               if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING and f.name not in value]
    if missing:
        raise ValueError(f"{prefix}: {', '.join(f'{prefix}.{name}' for name in missing)} "
                         f"{'is' if len(missing) == 1 else 'are'} required")
    return cls(**{str(k): v for k, v in value.items()})


# ------------------------------------------------------------ sample-level DP
@dataclass(frozen=True)
class PrivacyConfig:
    """Sample-level DP-SGD for every member of a cohort (Abadi et al., 2016), trained by Opacus.

    Each member clips the gradient of every training example to L2 norm
    ``max_grad_norm`` and adds ``N(0, (noise_multiplier * max_grad_norm)^2)``
    noise to the sum of a batch; its own accountant turns the steps taken
    into the ``(epsilon, delta)`` that member has spent on *its* data.

    The noise, from either of two fields (one of them is required):

    - ``noise_multiplier`` alone: that noise; ε is reported as training goes
      and nothing stops a member.
    - ``target_epsilon`` alone: the noise is computed (:func:`noise_for_target`)
      so that ε reaches ``target_epsilon`` at ``delta`` after ``epochs``
      epochs (``None``: the Trainer's ``max_epochs``, decided when training
      starts); a member stops before an epoch would take it past the target.
    - both: ``noise_multiplier`` is the noise and ``target_epsilon`` only the
      budget: a member stops training before its next epoch would take its ε
      past ``target_epsilon`` (``epochs`` is not used).

    Args:
        noise_multiplier: the noise's standard deviation over ``max_grad_norm``, > 0.
        max_grad_norm: the per-example clipping norm ``C``, > 0.
        target_epsilon: the ε budget, > 0; needs ``delta``.
        delta: the δ at which ε is reported, in (0, 1); well below one over a
            member's number of training examples (Dwork and Roth, 2014, "The
            Algorithmic Foundations of Differential Privacy", §2.3). ``None``
            is allowed without ``target_epsilon``: the noise is added but no
            ε can be reported.
        epochs: with ``target_epsilon`` alone, the epochs the noise is
            computed for (an int >= 1); ``None``: the Trainer's ``max_epochs``.
        accountant: Opacus' accountant: ``"rdp"`` (Rényi DP, the default:
            fast and an upper bound), ``"prv"`` (privacy loss random
            variables, Gopi et al. 2021: tighter, slower) or ``"gdp"``
            (Gaussian DP, Dong et al. 2019: an asymptotic approximation that
            Opacus flags as possibly *under*-estimating ε).
        poisson_sampling: draw each member's batches by Poisson sampling (every
            example in with probability ``q``), the sampling the accountants'
            amplification assumes; ``False`` shuffles instead, and the
            reported ε is then only an approximation.
        fix_model: replace the layers Opacus cannot train with ones it can
            (BatchNorm -> GroupNorm, LSTM -> DPLSTM, ...) instead of refusing
            the model (:func:`check_model`).
        secure_mode: Opacus' secure noise (a cryptographically secure
            generator, torchcsprng, and noise robust to floating-point
            attacks); for deployment, not for reproducible experiments.

    Every field is checked at once when the config is made, and every problem
    is reported in one ``ValueError``. The config is frozen: derive another
    with ``dataclasses.replace``, which checks again.

    Examples:
        >>> PrivacyConfig(target_epsilon=3.0, epochs=5).noise_multiplier is None
        True
        >>> PrivacyConfig(noise_multiplier=0)
        Traceback (most recent call last):
        ...
        ValueError: privacy.noise_multiplier must be a finite number > 0 or None, got 0
    """

    noise_multiplier: float | None = None
    max_grad_norm: float = 1.0
    target_epsilon: float | None = None
    delta: float | None = 1e-5
    epochs: int | None = None
    accountant: str = "rdp"
    poisson_sampling: bool = True
    fix_model: bool = False
    secure_mode: bool = False

    def __post_init__(self) -> None:
        errors: list[str] = []
        _check_positive(errors, "privacy.noise_multiplier", self.noise_multiplier, optional=True)
        _check_positive(errors, "privacy.max_grad_norm", self.max_grad_norm)
        _check_positive(errors, "privacy.target_epsilon", self.target_epsilon, optional=True)
        _check_delta(errors, "privacy.delta", self.delta)
        if self.noise_multiplier is None and self.target_epsilon is None:
            errors.append("privacy needs privacy.noise_multiplier (the noise of DP-SGD) or privacy.target_epsilon "
                          "(the budget the noise is computed for), got neither")
        if self.target_epsilon is not None and self.delta is None:
            errors.append(f"privacy.target_epsilon={self.target_epsilon!r} needs privacy.delta (ε is only defined "
                          "at a δ), got delta=None")
        if self.epochs is not None and not is_int_at_least(self.epochs, 1):
            errors.append(f"privacy.epochs must be an int >= 1 or None (the Trainer's max_epochs), got {self.epochs!r}")
        _check_choice(errors, "privacy.accountant", self.accountant, ACCOUNTANTS)
        for name in ("poisson_sampling", "fix_model", "secure_mode"):
            _check_bool(errors, f"privacy.{name}", getattr(self, name))
        _raise("privacy", errors)
        _normalise(self, ("noise_multiplier", "max_grad_norm", "target_epsilon", "delta"))

    @classmethod
    def from_any(cls, value: Any) -> PrivacyConfig | None:
        """``value`` as a config: ``None`` (no privacy), a :class:`PrivacyConfig`, or a mapping of its fields.

        A mapping is anything ``collections.abc.Mapping`` (a dict, Hydra's
        ``DictConfig``); an unknown key is an error that names it.

        Examples:
            >>> PrivacyConfig.from_any({"noise_multiplier": 1.0, "acountant": "prv"})
            Traceback (most recent call last):
            ...
            ValueError: privacy: unknown key 'acountant' (did you mean 'accountant'?); the keys are noise_multiplier, max_grad_norm, target_epsilon, delta, epochs, accountant, poisson_sampling, fix_model, secure_mode
        """
        return _from_any(cls, "privacy", value)

    def resolve_noise_multiplier(self, sample_rate: float, max_epochs: int | None = None) -> float:
        """The noise to train with: ``noise_multiplier`` when set, else the noise that spends ``target_epsilon``.

        ``sample_rate`` is the member's ``q`` (batch size over its number of
        training examples); the epochs are ``epochs`` or, when that is None,
        ``max_epochs`` (the Trainer's).

        Examples:
            >>> PrivacyConfig(noise_multiplier=0.8).resolve_noise_multiplier(0.01)
            0.8
        """
        if self.noise_multiplier is not None:
            return self.noise_multiplier
        epochs = self.epochs if self.epochs is not None else max_epochs
        if epochs is None or epochs == -1:  # -1: Lightning's "no limit"
            raise ValueError(f"privacy.target_epsilon={self.target_epsilon!r} needs the epochs to spend it over: "
                             "set privacy.epochs or the Trainer's max_epochs")
        return noise_for_target(self.target_epsilon, self.delta, sample_rate, epochs, self.accountant)


# -------------------------------------------------------------- user-level DP
@dataclass(frozen=True)
class FederatedPrivacy:
    """User-level DP-FedAvg (McMahan et al., 2018), with optional adaptive clipping (Andrew et al., 2021).

    Every round, each sampled client's update (its model minus the global
    model) is clipped to L2 norm ``clip_norm``, and the mean over the
    ``m`` expected clients gets ``N(0, (noise_multiplier * clip_norm / m)^2)``
    noise (:func:`~lightning_colearn.functional.privacy.dp_mean`). The
    accountant sees one sampled Gaussian mechanism a round, with noise
    multiplier ``noise_multiplier`` and sample rate ``m`` over the number of
    clients, so ε bounds what the released models say about any one
    client's whole data.

    Args:
        noise_multiplier: ``sigma``, the noise's standard deviation over the
            clipping norm for the whole round, > 0 (required: there is no
            default privacy).
        clip_norm: ``C``, the L2 bound of a client's update (the first
            round's, with ``adaptive``), > 0.
        adaptive: move ``C`` every round towards the ``target_quantile`` of
            the clients' update norms (Andrew et al., 2021). Part of the
            budget then goes to the noised count of unclipped clients, and
            the update noise becomes :meth:`update_noise_for` (slightly more
            than ``sigma``), so ``sigma`` stays the round's total.
        target_quantile: ``gamma``, the fraction of clients whose update
            should fit under ``C``, in (0, 1); 0.5 clips to the median norm,
            which Andrew et al. found to work across their tasks.
        clip_learning_rate: ``eta`` of the geometric update
            ``C <- C exp(-eta (b - gamma))``, > 0; Andrew et al. use 0.2.
        count_noise_multiplier: ``sigma_b``, the standard deviation of the
            noise on the count of unclipped clients, > ``noise_multiplier / 2``
            (below that the count alone would spend the whole budget).
            ``None``: :meth:`count_noise_for` decides once the number of
            clients a round is known.
        side: ``"server"`` adds the noise to the sum (the default: the noise
            is complete whoever reports); ``"client"`` has every client noise
            its own update with ``1 / m`` of the variance (distributed DP;
            the accounting is then optimistic in a round where fewer than
            ``m`` clients report).
        delta: the δ at which ε is reported, in (0, 1), well below one over the
            number of clients; ``None`` only without ``target_epsilon``.
        target_epsilon: the ε budget: training stops before the round that
            would take ε past it; needs ``delta``.
        accountant: ``"rdp"``, ``"prv"`` or ``"gdp"``, as for :class:`PrivacyConfig`.

    Examples:
        >>> dp = FederatedPrivacy(noise_multiplier=1.0, adaptive=True)
        >>> dp.count_noise_for(100)            # Andrew et al.'s m / 20
        5.0
        >>> round(dp.update_noise_for(100), 4)
        1.005
        >>> FederatedPrivacy(noise_multiplier=1.0, side="both")
        Traceback (most recent call last):
        ...
        ValueError: dp.side must be one of 'server', 'client', got 'both'
    """

    noise_multiplier: float
    clip_norm: float = 1.0
    adaptive: bool = False
    target_quantile: float = 0.5
    clip_learning_rate: float = 0.2
    count_noise_multiplier: float | None = None
    side: str = "server"
    delta: float | None = 1e-5
    target_epsilon: float | None = None
    accountant: str = "rdp"

    #: With ``count_noise_multiplier=None``, the count never takes more than this share of the budget.
    MAX_COUNT_SHARE: ClassVar[float] = 0.01

    def __post_init__(self) -> None:
        errors: list[str] = []
        _check_positive(errors, "dp.noise_multiplier", self.noise_multiplier)
        _check_positive(errors, "dp.clip_norm", self.clip_norm)
        _check_bool(errors, "dp.adaptive", self.adaptive)
        gamma = _real(self.target_quantile)
        if not 0 < gamma < 1:
            errors.append(f"dp.target_quantile must be a number in (0, 1), got {self.target_quantile!r}")
        _check_positive(errors, "dp.clip_learning_rate", self.clip_learning_rate)
        _check_positive(errors, "dp.count_noise_multiplier", self.count_noise_multiplier, optional=True)
        sigma, sigma_b = _real(self.noise_multiplier), _real(self.count_noise_multiplier)
        if math.isfinite(sigma) and sigma > 0 and math.isfinite(sigma_b) and 0 < sigma_b <= sigma / 2:
            errors.append(f"dp.count_noise_multiplier must be > dp.noise_multiplier / 2 = {sigma / 2:g} for the update "
                          f"noise and the count noise to fit in a budget of noise multiplier {sigma:g} "
                          f"(Andrew et al. 2021), got {self.count_noise_multiplier!r}")
        _check_choice(errors, "dp.side", self.side, DP_SIDES)
        _check_delta(errors, "dp.delta", self.delta)
        _check_positive(errors, "dp.target_epsilon", self.target_epsilon, optional=True)
        if self.target_epsilon is not None and self.delta is None:
            errors.append(f"dp.target_epsilon={self.target_epsilon!r} needs dp.delta (ε is only defined at a δ), "
                          "got delta=None")
        _check_choice(errors, "dp.accountant", self.accountant, ACCOUNTANTS)
        _raise("dp", errors)
        _normalise(self, ("noise_multiplier", "clip_norm", "target_quantile", "clip_learning_rate",
                          "count_noise_multiplier", "delta", "target_epsilon"))

    @classmethod
    def from_any(cls, value: Any) -> FederatedPrivacy | None:
        """``value`` as a config: ``None`` (no DP), a :class:`FederatedPrivacy`, or a mapping of its fields.

        Examples:
            >>> FederatedPrivacy.from_any({"noise_multiplier": 1.0, "clip": 0.5})
            Traceback (most recent call last):
            ...
            ValueError: dp: unknown key 'clip' (did you mean 'clip_norm'?); the keys are noise_multiplier, clip_norm, adaptive, target_quantile, clip_learning_rate, count_noise_multiplier, side, delta, target_epsilon, accountant
        """
        return _from_any(cls, "dp", value)

    def count_noise_for(self, expected_clients: float) -> float:
        """``sigma_b``: ``count_noise_multiplier`` when set, else ``max(m / 20, 5 * noise_multiplier)``.

        ``m / 20`` is Andrew et al.'s recommendation (2021, §3: the noised
        fraction of unclipped clients then has a standard deviation of 0.05,
        enough for the quantile to adapt fast). With few clients a round it
        would be tiny, below the ``noise_multiplier / 2`` the split needs or
        so close to it that the update noise would grow without bound; the
        floor ``5 * noise_multiplier`` keeps the count's share of the budget
        at most 1% (``(sigma / (2 sigma_b))^2``), the share it has in the
        paper's own setting (``m = 100``, ``sigma = 1``), so the update noise
        is at most 0.5% above ``sigma``. The price with few clients is a
        noisy quantile estimate: adaptive clipping is made for rounds of many
        clients; with a handful, a fixed ``clip_norm`` is the better choice.

        Examples:
            >>> FederatedPrivacy(noise_multiplier=1.0).count_noise_for(10)    # 10 / 20 < 5 * 1.0
            5.0
        """
        m = _real(expected_clients)
        if not (math.isfinite(m) and m > 0):
            raise ValueError(f"dp: the expected number of clients a round must be a finite number > 0, got {expected_clients!r}")
        if self.count_noise_multiplier is not None:
            return self.count_noise_multiplier
        floor = self.noise_multiplier / (2 * math.sqrt(self.MAX_COUNT_SHARE))
        return max(m / 20, floor)

    def update_noise_for(self, expected_clients: float) -> float:
        """``sigma_Delta``, the noise multiplier of the clipped updates' sum.

        ``noise_multiplier`` without ``adaptive``; with it, Andrew et al.'s
        split :func:`~lightning_colearn.functional.privacy.split_noise_multiplier`
        of ``noise_multiplier`` between the updates and the count (whose noise is
        :meth:`count_noise_for`). Feed the accountant ``noise_multiplier`` either way.

        Examples:
            >>> FederatedPrivacy(noise_multiplier=1.2).update_noise_for(8)
            1.2
        """
        sigma_b = self.count_noise_for(expected_clients)
        return split_noise_multiplier(self.noise_multiplier, sigma_b) if self.adaptive else self.noise_multiplier


# ----------------------------------------------------------------- accounting
def _opacus_accountants() -> dict[str, type]:
    try:
        from opacus.accountants import GaussianAccountant, PRVAccountant, RDPAccountant
    except ImportError as err:  # pragma: no cover - the extra is installed in the tests
        raise ImportError("privacy needs Opacus: pip install 'lightning-colearn[privacy]'") from err
    return {"rdp": RDPAccountant, "prv": PRVAccountant, "gdp": GaussianAccountant}


def _check_accountant(accountant: object) -> None:
    from opacus.accountants import IAccountant

    if not isinstance(accountant, IAccountant):
        raise TypeError(f"privacy: expected an Opacus accountant (make_accountant), got {type(accountant).__name__}")


def _checked(name: str, test: bool, allowed: str, value: object) -> None:
    if not test:
        raise ValueError(f"privacy.{name} must be {allowed}, got {value!r}")


def make_accountant(name: str) -> IAccountant:
    """A new Opacus accountant: ``"rdp"`` (``RDPAccountant``), ``"prv"`` (``PRVAccountant``), ``"gdp"`` (``GaussianAccountant``).

    Examples:
        >>> type(make_accountant("prv")).__name__
        'PRVAccountant'
    """
    errors: list[str] = []
    _check_choice(errors, "privacy.accountant", name, ACCOUNTANTS)
    _raise("privacy", errors)
    return _opacus_accountants()[name]()


def epsilon(accountant: IAccountant, delta: float) -> float:
    """The ε ``accountant`` has spent so far at ``delta``; 0.0 before its first step.

    Examples:
        >>> accountant = make_accountant("rdp")
        >>> epsilon(accountant, 1e-5)
        0.0
        >>> accountant.step(noise_multiplier=1.0, sample_rate=0.1)
        >>> epsilon(accountant, 1e-5) > 0
        True
    """
    _check_accountant(accountant)
    _checked("delta", 0 < _real(delta) < 1, "a number in (0, 1) to report an epsilon", delta)
    if not accountant.history:
        return 0.0  # Opacus' PRV and GDP accountants fail on an empty history; nothing is spent yet
    return float(accountant.get_epsilon(delta=float(delta)))


def epsilon_after(accountant: IAccountant, delta: float, *, noise_multiplier: float, sample_rate: float,
                  steps: int) -> float:
    """The ε ``accountant`` would report at ``delta`` after ``steps`` more steps of ``(noise_multiplier, sample_rate)``.

    ``accountant`` is not changed: the steps go into a copy's history (the
    same history ``steps`` calls of ``accountant.step`` would leave), so a
    caller can stop a member *before* a step, epoch or round would take it
    past its budget. ``steps=0`` is the ε so far. Opacus' Gaussian (GDP)
    accountant only composes one constant ``(noise_multiplier,
    sample_rate)``; another one is a ``ValueError``.

    Examples:
        >>> accountant = make_accountant("rdp")
        >>> after = epsilon_after(accountant, 1e-5, noise_multiplier=1.0, sample_rate=0.1, steps=10)
        >>> accountant.history, after > 0
        ([], True)
    """
    _check_accountant(accountant)
    sigma, q = _real(noise_multiplier), _real(sample_rate)
    _checked("noise_multiplier", math.isfinite(sigma) and sigma > 0, "a finite number > 0", noise_multiplier)
    _checked("sample_rate", 0 < q <= 1, "a number in (0, 1]", sample_rate)
    _checked("steps", is_int_at_least(steps, 0), "an int >= 0", steps)
    history = [tuple(entry) for entry in accountant.history]
    if steps:
        if history and history[-1][0] == sigma and history[-1][1] == q:
            history[-1] = (history[-1][0], history[-1][1], history[-1][2] + int(steps))
        elif history and accountant.mechanism() == "gdp":
            raise ValueError(f"privacy.accountant 'gdp' composes one constant noise multiplier and sample rate; the "
                             f"accountant has ({history[-1][0]}, {history[-1][1]}), asked for ({sigma}, {q}): use 'rdp' or 'prv'")
        else:
            history.append((sigma, q, int(steps)))
    ahead = copy.copy(accountant)  # shallow: no new GDP warning; the history list is a new one
    ahead.history = history
    return epsilon(ahead, delta)


def noise_for_target(target_epsilon: float, delta: float, sample_rate: float, epochs: int, accountant: str = "rdp",
                     *, epsilon_tolerance: float = 0.01, steps: int | None = None) -> float:
    """The smallest noise multiplier (to ``epsilon_tolerance``) whose ε after ``epochs`` epochs is ``<= target_epsilon``.

    A thin wrapper of Opacus' ``get_noise_multiplier`` (a bisection on the
    accountant's ε) with errors that name the fields: ``epochs / sample_rate``
    steps (rounded down) of sampling rate ``sample_rate``, or exactly ``steps``
    when given (a cohort's epoch can hold more steps than ``1 / sample_rate``:
    shorter members cycle). The ε it reaches is within ``epsilon_tolerance``
    below the target.

    Examples:
        >>> sigma = noise_for_target(3.0, 1e-5, 0.01, 2)
        >>> accountant = make_accountant("rdp")
        >>> 3.0 - 0.01 <= epsilon_after(accountant, 1e-5, noise_multiplier=sigma, sample_rate=0.01, steps=200) <= 3.0
        True
    """
    target, d, q = _real(target_epsilon), _real(delta), _real(sample_rate)
    _checked("target_epsilon", math.isfinite(target) and target > 0, "a finite number > 0", target_epsilon)
    _checked("delta", 0 < d < 1, "a number in (0, 1)", delta)
    _checked("sample_rate", 0 < q <= 1, "a number in (0, 1]", sample_rate)
    _checked("epochs", is_int_at_least(epochs, 1), "an int >= 1", epochs)
    if steps is not None:
        _checked("steps", is_int_at_least(steps, 1), "an int >= 1", steps)
    tolerance = _real(epsilon_tolerance)
    if not (math.isfinite(tolerance) and tolerance > 0):
        raise ValueError(f"epsilon_tolerance must be a finite number > 0, got {epsilon_tolerance!r}")
    make_accountant(accountant)  # checks the name (and that Opacus is there) with our message
    from opacus.accountants.utils import get_noise_multiplier

    try:
        with warnings.catch_warnings():  # the bisection's large trial noises warn about RDP orders; the answer does not
            warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
            length = {"epochs": int(epochs)} if steps is None else {"steps": int(steps)}
            return float(get_noise_multiplier(target_epsilon=target, target_delta=d, sample_rate=q, **length,
                                              accountant=accountant, epsilon_tolerance=tolerance))
    except ValueError as err:
        raise ValueError(f"privacy.target_epsilon={target_epsilon!r} cannot be reached at delta={delta!r} over {epochs} "
                         f"epochs of sample rate {sample_rate!r} ({int(int(epochs) / q)} steps) with any noise multiplier "
                         f"Opacus tries ({err}); raise target_epsilon or delta, or train fewer epochs") from err


# --------------------------------------------------------------------- layers
#: Opacus' replacement for each kind of layer it can fix (``ModuleValidator.fix``).
_REPLACEMENTS = {
    "BatchNorm": "BatchNorm -> GroupNorm",
    "InstanceNorm": "InstanceNorm without running statistics",
    "LSTM": "LSTM -> DPLSTM",
    "GRU": "GRU -> DPGRU",
    "RNN": "RNN -> DPRNN",
    "MultiheadAttention": "MultiheadAttention -> DPMultiheadAttention",
}


def _first_sentence(text: str) -> str:
    return re.split(r"(?<=[.!?])\s", text.strip(), maxsplit=1)[0]


def _stateful_norm(module: nn.Module) -> bool:
    """A norm layer that mixes the examples of a batch or keeps running statistics, trainable parameters or not."""
    from torch.nn.modules.batchnorm import _BatchNorm
    from torch.nn.modules.instancenorm import _InstanceNorm

    return isinstance(module, (_BatchNorm, _InstanceNorm))


def _problems(model: nn.Module) -> list[tuple[str, nn.Module, str]]:
    """``(path, layer, Opacus' message)`` for every layer DP-SGD cannot train, judged in training mode.

    Opacus' ``ModuleValidator.validate`` checks the layers with trainable
    parameters only, so a BatchNorm with ``affine=False`` (or frozen) goes
    through, though it still makes every example's output depend on its batch
    and updates running statistics from the private data; its own validator
    is run on those norm layers here too.
    """
    from opacus.validators import ModuleValidator

    modes = [(m, m.training) for m in model.modules()]
    model.train()  # judged as it will be trained: Lightning trains in training mode
    try:
        reported = [str(e) for e in ModuleValidator.validate(model, strict=False)]
        found = []
        for path, layer in model.named_modules():
            validator = ModuleValidator.VALIDATORS.get(type(layer))
            trainable = any(p.requires_grad for p in layer.parameters(recurse=False))
            if validator is not None and (trainable or _stateful_norm(layer)):
                found.extend((path or "(the model itself)", layer, str(e)) for e in validator(layer))
    finally:
        for module, mode in modes:
            module.training = mode
    named = {message for _, _, message in found}
    found.extend(("(the model)", model, message) for message in reported if message not in named)
    return found


def _describe(problems: list[tuple[str, nn.Module, str]]) -> str:
    return ", ".join(f"{path} ({type(layer).__name__}: {_first_sentence(message)})" for path, layer, message in problems)


def _replace(root: nn.Module, path: str, new: nn.Module) -> nn.Module:
    if path in ("", "(the model itself)"):
        return new
    parent_path, _, name = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    parent._modules[name] = new
    return root


def check_model(model: nn.Module, fix: bool) -> nn.Module:
    """``model`` if DP-SGD can train it; else, with ``fix``, a copy with Opacus' replacements; else a ``ValueError``.

    The layers are judged by Opacus' ``ModuleValidator`` in training mode
    (the mode they train in). Without ``fix``, the error lists every
    offending layer by its module path, its class and the first sentence of
    what Opacus says, and the replacement ``privacy.fix_model=true`` would
    make. With ``fix``, ``ModuleValidator.fix`` returns a fixed copy
    (BatchNorm -> GroupNorm with ``gcd(32, channels)`` groups, Wu and He,
    2018, "Group Normalization"; LSTM -> DPLSTM; ...), the norm layers
    without trainable parameters that Opacus does not look at are replaced
    by its fixers too, and the copy is checked again (an error if anything is
    left). The replaced layers start afresh (GroupNorm has no running
    statistics to inherit), so fix a model before training it and before
    building its optimizer: the copy has new parameters.

    Examples:
        >>> from torch import nn
        >>> mlp = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> check_model(mlp, fix=False) is mlp
        True
        >>> bn = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8))
        >>> check_model(bn, fix=False)
        Traceback (most recent call last):
        ...
        ValueError: privacy: the model has layers DP-SGD cannot train: 1 (BatchNorm1d: BatchNorm cannot support training with differential privacy.); pass privacy.fix_model=true to replace them (BatchNorm -> GroupNorm)
        >>> fixed = check_model(bn, fix=True)
        >>> type(fixed[1]).__name__, fixed[1].num_groups, type(bn[1]).__name__   # the model itself is left as it was
        ('GroupNorm', 8, 'BatchNorm1d')
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"privacy: check_model takes an nn.Module, got {type(model).__name__}")
    if not isinstance(fix, bool):
        raise TypeError(f"privacy.fix_model must be true or false, got {fix!r}")
    try:
        from opacus.validators import ModuleValidator
    except ImportError as err:  # pragma: no cover - the extra is installed in the tests
        raise ImportError("privacy needs Opacus: pip install 'lightning-colearn[privacy]'") from err

    problems = _problems(model)
    if not problems:
        return model
    if not fix:
        kinds = sorted({hint for _, layer, _ in problems for key, hint in _REPLACEMENTS.items()
                        if key in type(layer).__name__ and type(layer) in ModuleValidator.FIXERS})
        unfixable = [path for path, layer, _ in problems if type(layer) not in ModuleValidator.FIXERS]
        advice = f"pass privacy.fix_model=true to replace them ({', '.join(kinds) or 'Opacus replacements'})"
        if unfixable:
            advice = (f"{', '.join(unfixable)} cannot be replaced automatically: change "
                      f"{'it' if len(unfixable) == 1 else 'them'} in the model"
                      + (f"; privacy.fix_model=true replaces the others ({', '.join(kinds)})" if kinds else ""))
        raise ValueError(f"privacy: the model has layers DP-SGD cannot train: {_describe(problems)}; {advice}")

    fixed = ModuleValidator.fix(model)  # a copy; Opacus replaces the layers with trainable parameters
    for path, layer, _ in _problems(fixed):  # Opacus leaves norm layers without trainable parameters alone
        fixer = ModuleValidator.FIXERS.get(type(layer))
        if fixer is None or path == "(the model)":
            continue
        frozen = any(True for _ in layer.parameters()) and not any(p.requires_grad for p in layer.parameters())
        new = fixer(layer)
        reference = next(iter([*layer.parameters(), *layer.buffers()]), None)
        if reference is not None:
            new = new.to(reference.device)
        if frozen:
            new.requires_grad_(False)
        fixed = _replace(fixed, path, new)
    left = _problems(fixed)
    if left:
        raise ValueError(f"privacy: privacy.fix_model=true replaced what Opacus can replace, but the model still has layers "
                         f"DP-SGD cannot train: {_describe(left)}; change them in the model")
    return fixed
