"""Private members: each member of a cohort trains with DP-SGD through Opacus, with its own accountant.

:class:`PrivateMembers` wires Opacus (Meta's library for DP-SGD: per-sample gradients, clipping,
Gaussian noise, accountants) to the members of a :class:`~lightning_colearn.CohortModule` on the loop
backend; none of the DP-SGD mechanics is written here (Abadi et al. 2016, "Deep Learning with
Differential Privacy"):

* every member gets Opacus' ``GradSampleModule`` hooks (kept outside the module tree, so the members'
  parameter names, checkpoints and cohort arithmetic do not change) and its optimizer becomes a
  ``DPOptimizer`` that clips every per-sample gradient to ``max_grad_norm``, adds Gaussian noise of
  standard deviation ``noise_multiplier * max_grad_norm`` from the member's own seeded generator, and
  divides by the expected batch size;
* every member has its own accountant, stepped by its optimizer with the member's sampling rate ``q``
  (``batch_size / len(its training split)``; the data module draws Poisson batches with that rate);
* a member whose next epoch would take its ε past ``target_epsilon`` is retired: it trains no more.

Accountant histories, noise generators and retirements are checkpointed (:meth:`state_dict`), so a
resumed run continues the same accounting, and the same noise.
"""

from __future__ import annotations

from collections.abc import Sequence
import warnings
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer

from lightning_colearn.privacy import PrivacyConfig, epsilon, epsilon_after, make_accountant, noise_for_target

__all__ = ["PrivateMembers"]

# Opacus' per-sample gradient hooks are full backward hooks on the layers; on a first layer, whose input needs
# no gradient, torch notes at every fit that the hook fires for the outputs only: what the hooks use.
warnings.filterwarnings("ignore", message="Full backward hook is firing when gradients are computed with respect to module outputs")


class PrivateMembers:
    """DP-SGD state of every member: hooks, DP optimizers, accountants, noise generators, retirements.

    Args:
        config: the privacy settings.
        members: the cohort's member modules (the hooks go on their layers).
        sample_rates: each member's sampling rate ``q``.
        batch_size: the expected batch size (Opacus divides the noised sum by it).
        epochs: the epochs the noise is computed for, with ``target_epsilon`` and no ``noise_multiplier``.
        steps_per_epoch: the data module's steps an epoch (the accounting of "one more epoch").
        seed: seeds each member's noise generator (``seed``, member).
    """

    def __init__(self, config: PrivacyConfig, members: Sequence[nn.Module], sample_rates: Sequence[float], batch_size: int,
                 epochs: int | None, steps_per_epoch: int, seed: int = 0) -> None:
        from opacus import GradSampleModule  # the privacy extra: imported only when a cohort is private

        if len(sample_rates) != len(members):
            raise ValueError(f"privacy: one sampling rate per member ({len(members)}), got {len(sample_rates)}")
        self.config, self.batch_size, self.steps_per_epoch = config, batch_size, steps_per_epoch
        self.sample_rates = [float(q) for q in sample_rates]
        if config.noise_multiplier is not None:
            self.noise = [float(config.noise_multiplier)] * len(members)
        else:
            if epochs is None:
                raise ValueError("privacy.target_epsilon needs the epochs to spend it over: set privacy.epochs or trainer.max_epochs")
            # calibrated to the steps the members really take: epochs x the cohort's steps an epoch
            self.noise = [noise_for_target(config.target_epsilon, config.delta, q, epochs, config.accountant,
                                           steps=epochs * steps_per_epoch) for q in self.sample_rates]
        self.samplers = [GradSampleModule(m, loss_reduction="mean", batch_first=True) for m in members]
        self.accountants = [make_accountant(config.accountant) for _ in members]
        self.generators = [torch.Generator().manual_seed(seed * 1_000_003 + i) for i in range(len(members))]
        #: Members whose budget is spent: they train no more.
        self.retired: set[int] = set()

    def wrap(self, optimizers: Sequence[Optimizer]) -> list[Optimizer]:
        """Each member's optimizer as an Opacus ``DPOptimizer`` that steps the member's accountant."""
        from opacus.optimizers import DPOptimizer

        wrapped = []
        for i, opt in enumerate(optimizers):
            # secure_mode: Opacus' noise that resists floating-point attacks, from torch's global generator (not a
            # seeded one, which anyone knowing the seed could replay; a resumed run then draws other noise)
            dp = DPOptimizer(opt, noise_multiplier=self.noise[i], max_grad_norm=self.config.max_grad_norm,
                             expected_batch_size=self.batch_size,
                             generator=None if self.config.secure_mode else self.generators[i],
                             secure_mode=self.config.secure_mode)
            dp.attach_step_hook(self.accountants[i].get_optimizer_hook_fn(sample_rate=self.sample_rates[i]))
            wrapped.append(dp)
        return wrapped

    def epsilon(self, member: int) -> float:
        """Member ``member``'s ε so far, at the configured δ (NaN without a δ to report it at)."""
        if self.config.delta is None:
            return float("nan")
        return epsilon(self.accountants[member], self.config.delta)

    def spent_after_next_epoch(self, member: int) -> bool:
        """True when one more epoch would take the member past ``target_epsilon`` (never when there is none)."""
        if self.config.target_epsilon is None:
            return False
        after = epsilon_after(self.accountants[member], self.config.delta, noise_multiplier=self.noise[member],
                              sample_rate=self.sample_rates[member], steps=self.steps_per_epoch)
        return after > self.config.target_epsilon

    def remove_hooks(self) -> None:
        for sampler in self.samplers:
            sampler.remove_hooks()

    # ------------------------------------------------------------ checkpoint
    def state_dict(self) -> dict[str, Any]:
        return {
            "accountants": [a.state_dict() for a in self.accountants],
            "generators": [g.get_state() for g in self.generators],
            "retired": sorted(self.retired),
            "noise": list(self.noise),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        try:
            accountants, generators, retired = state["accountants"], state["generators"], state["retired"]
            n = len(self.accountants)
            if len(accountants) != n or len(generators) != n:
                raise ValueError(f"{len(accountants)} accountants and {len(generators)} noise generators for {n} members")
            if not all(isinstance(i, int) and 0 <= i < n for i in retired):
                raise ValueError(f"retired members must be indices in [0, {n - 1}], got {retired!r}")
            fresh = [make_accountant(self.config.accountant) for _ in range(n)]
            for accountant, saved in zip(fresh, accountants):
                accountant.load_state_dict(saved)
            for generator, saved in zip(self.generators, generators):
                torch.Generator().set_state(saved)  # checked on a scratch generator first: nothing half-loaded
        except (KeyError, TypeError, ValueError, RuntimeError) as err:
            raise ValueError(f"privacy checkpoint state is corrupt or from another run: {err}") from err
        for accountant, saved in zip(self.accountants, accountants):
            accountant.load_state_dict(saved)
        for generator, saved in zip(self.generators, generators):
            generator.set_state(saved)
        self.retired = set(retired)
