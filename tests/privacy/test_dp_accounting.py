"""Privacy accounting: basic composition for Laplace, RDP for Gaussian, against Opacus.

Opacus (and with it torch) is imported lazily inside the tests that use it as an oracle;
the gateway code under test never imports it.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import pytest

from privacy.dp.accounting import (
    OPACUS_DEFAULT_ORDERS,
    RDP_ORDERS,
    BasicCompositionAccountant,
    RdpAccountant,
    gaussian_rho_for_epsilon,
    rdp_to_epsilon,
)
from privacy.dp.ledger import fits
from privacy.dp.mechanisms import GridMechanism, NoiseSpec


def opacus_rdp_accountant() -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch/opacus import-time deprecations are not ours
        from opacus.accountants import RDPAccountant  # type: ignore[import-untyped]

    return RDPAccountant()


def opacus_epsilon(accountant: Any, delta: float, orders: tuple[float, ...]) -> float:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "optimal order is the largest alpha"
        return float(accountant.get_epsilon(delta, alphas=list(orders)))


class TestAgainstOpacus:
    @pytest.mark.parametrize("orders", [OPACUS_DEFAULT_ORDERS, RDP_ORDERS], ids=["opacus-alphas", "ledger-orders"])
    def test_running_rdp_vector_matches_rdp_accountant_on_the_same_sequence(
        self, orders: tuple[float, ...]
    ) -> None:
        """Mixed noise multipliers, one RDPAccountant.step per answered row (sample_rate 1):
        the compact vector converts to the same ε as Opacus, at every prefix."""
        opacus = opacus_rdp_accountant()
        sequence = [(1.0, 3), (3.7, 20), (0.8, 1), (10.0, 100), (2.5, 7)]
        spent = [0.0] * len(orders)
        for noise_multiplier, rows in sequence:
            rho = 1.0 / (2.0 * noise_multiplier**2)  # Δ = 1, σ = noise_multiplier
            acct = RdpAccountant(rho_per_row=rho, budget_epsilon=1e6, budget_delta=1e-5, orders=orders)
            for _ in range(rows):
                opacus.step(noise_multiplier=noise_multiplier, sample_rate=1.0)
            spent = [s + c for s, c in zip(spent, acct.charge(rows), strict=True)]
            for delta in (1e-5, 1e-7):
                ours = rdp_to_epsilon(spent, delta, orders)[0]
                assert math.isclose(ours, opacus_epsilon(opacus, delta, orders), rel_tol=1e-12)

    def test_stage_charges_match_opacus_for_the_calibrated_noise(self) -> None:
        """The noise multiplier OpenDP actually uses (σ/Δ₂ of the calibrated mechanism) run
        through Opacus gives no more ε than the accountant's charge says, and only a little
        less: the gap is OpenDP charging the rounding of inputs to the 2**k grid."""
        spec = NoiseSpec("gaussian", 0.0, 1.0, epsilon=1.0, delta=1e-6)
        mechanism = GridMechanism(spec, width=10, fast_ffi=False)
        noise_multiplier = mechanism.scale / mechanism.sensitivity
        acct = RdpAccountant(rho_per_row=spec.rho_per_row(), budget_epsilon=50.0, budget_delta=1e-5)
        opacus = opacus_rdp_accountant()
        for _ in range(25):
            opacus.step(noise_multiplier=noise_multiplier, sample_rate=1.0)
        ours = acct.epsilon(acct.charge(25))
        theirs = opacus_epsilon(opacus, 1e-5, RDP_ORDERS)
        assert theirs <= ours
        assert theirs == pytest.approx(ours, rel=1e-3)

    def test_conversion_matches_opacus_analysis_module(self) -> None:
        """rdp_to_epsilon is Opacus's get_privacy_spent formula (value and optimal order)."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from opacus.accountants.analysis import rdp as opacus_rdp  # type: ignore[import-untyped]

            rdp = [a * 0.37 for a in OPACUS_DEFAULT_ORDERS]
            theirs = opacus_rdp.get_privacy_spent(orders=list(OPACUS_DEFAULT_ORDERS), rdp=rdp, delta=1e-6)
        ours = rdp_to_epsilon(rdp, 1e-6, OPACUS_DEFAULT_ORDERS)
        assert ours[0] == pytest.approx(float(theirs[0]), rel=1e-12)
        assert ours[1] == float(theirs[1])


class TestGaussianCalibration:
    @pytest.mark.parametrize(("epsilon", "delta"), [(0.5, 1e-6), (1.0, 1e-5), (4.0, 1e-7), (20.0, 1e-6)])
    def test_one_row_costs_exactly_its_epsilon(self, epsilon: float, delta: float) -> None:
        """ρ from (ε, δ) converts back to ε at the same δ."""
        rho = gaussian_rho_for_epsilon(epsilon, delta)
        acct = RdpAccountant(rho_per_row=rho, budget_epsilon=epsilon, budget_delta=delta)
        assert acct.epsilon(acct.charge(1)) == pytest.approx(epsilon, rel=1e-9)
        assert acct.rows_remaining(acct.zero()) == 1

    def test_rdp_admission_rule_is_the_conversion(self) -> None:
        """'some order within its limit' holds exactly while the converted ε is within budget."""
        acct = RdpAccountant(rho_per_row=0.01, budget_epsilon=3.0, budget_delta=1e-5)
        rows = acct.rows_remaining(acct.zero())
        assert acct.epsilon(acct.charge(rows)) <= 3.0 * (1 + 1e-9)
        assert acct.epsilon(acct.charge(rows + 1)) > 3.0
        assert fits(acct.zero(), acct.charge(rows), acct.limit())
        assert not fits(acct.zero(), acct.charge(rows + 1), acct.limit())
        assert rows > 3.0 / acct.request_epsilon(1)  # RDP beats basic composition here


class TestBasicComposition:
    def test_ten_rows_of_half_an_epsilon_spend_five(self) -> None:
        acct = BasicCompositionAccountant(epsilon_per_row=0.5, budget_epsilon=5.0)
        assert acct.charge(10) == (5.0,)
        assert acct.rows_remaining((0.0,)) == 10
        assert acct.rows_remaining((4.5,)) == 1
        assert acct.rows_remaining((5.0,)) == 0
        assert fits((4.5,), acct.charge(1), acct.limit())
        assert not fits((5.0,), acct.charge(1), acct.limit())

    def test_float_sums_do_not_lose_the_last_row(self) -> None:
        """0.1 added 50 times is 5.000000000000002 in binary: the 50th row still fits."""
        acct = BasicCompositionAccountant(epsilon_per_row=0.1, budget_epsilon=5.0)
        used = 0.0
        for _ in range(50):
            assert fits((used,), acct.charge(1), acct.limit())
            used += 0.1
        assert not fits((used,), acct.charge(1), acct.limit())
