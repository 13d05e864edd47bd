"""Parameters shared by several merge methods, with their checks."""

from __future__ import annotations

import math

from loracombench.merging.registry import Param

SIGN_MODES = ("sum", "count")


def density(default: float, help: str) -> Param:
    return Param("density", default, float, help, _check_density)


def rank(help: str, name: str = "rank") -> Param:
    return Param(name, 0, int, help, _check_rank)


def lam() -> Param:
    return Param("lam", 1.0, float, "factor applied to the merged update", _check_finite)


def sign_mode() -> Param:
    return choice("sign_mode", "sum", SIGN_MODES,
                  "TIES sign election: sign of the summed values (sum) or of the count of signs (count)")


def seed() -> Param:
    return Param("seed", 0, int, "seed of the random drop masks", _check_seed)


def fraction(name: str, default: float, help: str, *, zero_allowed: bool = False) -> Param:
    return Param(name, default, float, help, _check_closed_fraction if zero_allowed else _check_density)


def choice(name: str, default: str, options: tuple[str, ...], help: str) -> Param:
    def check(value: object) -> str | None:
        return None if value in options else f"must be one of {', '.join(options)}"

    return Param(name, default, str, f"{help} ({' | '.join(options)})", check)


def _check_density(value: float) -> str | None:
    return None if 0.0 < value <= 1.0 else "must be in (0, 1]"


def _check_closed_fraction(value: float) -> str | None:
    return None if 0.0 <= value <= 1.0 else "must be in [0, 1]"


def _check_rank(value: int) -> str | None:
    return None if value >= 0 else "must be an integer >= 0"


def _check_finite(value: float) -> str | None:
    return None if math.isfinite(value) else "must be finite"


def _check_seed(value: int) -> str | None:
    return None if value >= 0 else "must be an integer >= 0"
