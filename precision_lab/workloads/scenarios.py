"""Scenarios: the ways a stress suite pushes an optimizer towards where low precision breaks.

A scenario chooses the data, may scale the loss, and may override the optimizer's
hyperparameters. It changes nothing else, so a run and its float32 control differ only
in their dtype. A scenario that stresses one hyperparameter applies only to the optimizer
families that have it (``overrides`` returns None for the others, and the suite skips
those combinations: they would repeat the baseline).

Float16 bounds referred to below: largest finite 65,504; smallest normal 2**-14 (6.1e-5);
smallest subnormal 2**-24 (6.0e-8). Bfloat16 has float32's range with 8 bits of precision.
"""

from __future__ import annotations

from typing import ClassVar

from precision_lab.workloads.data import Dataset, digits, synthetic

FLOAT16_MAX = 65_504.0
KRONECKER_FAMILIES = ("singd", "kfac")


class Scenario:
    """Baseline: the digits as they are, the optimizer's default hyperparameters.

    Stresses nothing: it shows how each optimizer and dtype behaves when nothing is
    pushed, and what accuracy each reaches, so the other scenarios have a reference.
    """

    name: ClassVar[str] = "baseline"
    loss_scale: ClassVar[float] = 1.0

    def dataset(self) -> Dataset:
        """The data of this scenario (float32 features; cast later to the run's dtype)."""
        return digits()

    def overrides(self, family: str) -> dict | None:
        """Hyperparameters this scenario sets for an optimizer family; None: not applicable."""
        return {}

    def description(self) -> str:
        """The first line of the docstring, for tables and reports."""
        return (type(self).__doc__ or "").strip().splitlines()[0]


class IllConditioned(Scenario):
    """Ill-conditioned inputs: synthetic features whose scales span four decades.

    The input covariance has condition number 1e8. Kronecker factors built from these
    inputs (KFAC's ``A``, SINGD's ``K^T a^T a K``) inherit it: bfloat16's 8-bit mantissa
    (relative spacing 2**-8) cannot resolve the small directions beside the large ones,
    inverting ``A`` amplifies rounding by the condition number, and float16 overflows
    products of the largest features. The float32 control tells whether a failure here
    is the dtype's or the problem's (it can diverge in float32 too).
    """

    name: ClassVar[str] = "ill_conditioned"
    decades: ClassVar[float] = 4.0

    def dataset(self) -> Dataset:
        return synthetic(self.decades)


class NearFloat16Max(Scenario):
    """Activations near the float16 maximum: digit features scaled so that max |x| = 16,384.

    16,384 is a quarter of float16's largest finite value: the inputs and first-layer
    activations stay representable, but their second moments (``a^T a``, about 1e8) do
    not. KFAC must form and invert ``A = a^T a / n``, which overflows to inf in float16;
    SINGD forms ``K^T a^T a K`` whose scale ``K`` can absorb. Bfloat16 shares float32's
    range, so there this scenario only tests rounding at large magnitudes.
    """

    name: ClassVar[str] = "near_fp16_max"
    target_max: ClassVar[float] = FLOAT16_MAX / 4

    def dataset(self) -> Dataset:
        data = digits()
        scale = self.target_max / float(data.train_x.abs().max())
        return data.map_features(lambda x: x * scale)


class GradientUnderflow(Scenario):
    """Gradients near underflow: the loss is multiplied by 2**-14 before backpropagation.

    Cross-entropy gradients with respect to the logits are at most 1/batch (1.6e-2 for 64
    examples); scaled by 2**-14 they fall to about 1e-6, inside float16's subnormal range
    (below 6.1e-5), where few bits of precision remain and smaller products flush to
    zero. Gradient factors (KFAC's ``G``, SINGD's ``C^T g^T g C``) are squares of these and
    underflow entirely unless scaled. In mixed float16 the GradScaler should rescue the
    run; bfloat16's float32 range should not underflow at all.
    """

    name: ClassVar[str] = "gradient_underflow"
    loss_scale: ClassVar[float] = 2.0**-14


class TinyDamping(Scenario):
    """Tiny damping: lambda = 1e-8 for SINGD and KFAC (defaults about 1e-3).

    Damping is what keeps KFAC's ``A + lambda I`` and ``G + lambda I`` invertible when
    the factors are rank deficient (digits have constant border pixels: ``A`` is singular).
    At 1e-8 it is below bfloat16's and float16's resolution relative to the factors'
    entries, so it vanishes when added: Cholesky fails or inverses blow up. SINGD never
    inverts; damping enters only its update of ``K`` and ``C``.
    """

    name: ClassVar[str] = "tiny_damping"
    damping: ClassVar[float] = 1e-8

    def overrides(self, family: str) -> dict | None:
        return {"damping": self.damping} if family in KRONECKER_FAMILIES else None


class LargeLrCov(Scenario):
    """Large lr_cov: SINGD's preconditioner step size beta1 = 0.5 (default 0.01).

    SINGD updates ``K <- K (I - beta1 m_K)``, a truncated matrix exponential that is only
    accurate for small ``beta1 m_K``; a large step lets ``K`` and ``C`` grow or oscillate,
    and low precision rounds the product ``K (I - beta1 m_K)`` each step. KFAC has no
    such step (it replaces its inverses), so this scenario applies to SINGD only.
    """

    name: ClassVar[str] = "large_lr_cov"
    lr_cov: ClassVar[float] = 0.5

    def overrides(self, family: str) -> dict | None:
        return {"lr_cov": self.lr_cov} if family == "singd" else None


_ALL = (Scenario, IllConditioned, NearFloat16Max, GradientUnderflow, TinyDamping, LargeLrCov)
SCENARIOS: dict[str, Scenario] = {cls.name: cls() for cls in _ALL}


def get_scenario(name: str) -> Scenario:
    """The scenario called ``name``.

    Raises:
        ValueError: For an unknown name, in one sentence listing the known ones.
    """
    if name not in SCENARIOS:
        raise ValueError(f"Unknown scenario {name!r}; expected one of {', '.join(SCENARIOS)}.")
    return SCENARIOS[name]
