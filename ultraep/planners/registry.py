"""Planner lookup by name, for command lines, configs and benchmarks."""

from __future__ import annotations

import dataclasses

from ultraep.planners.base import Planner
from ultraep.planners.eplb import EplbConfig, EplbPlanner
from ultraep.planners.lp_reroute import LpRerouteConfig, LpReroutePlanner
from ultraep.planners.milp import MilpConfig, MilpPlanner
from ultraep.planners.none import NonePlanner
from ultraep.planners.pairing import PairingPlanner
from ultraep.planners.quota import QuotaConfig, QuotaPlanner

__all__ = ["PLANNER_NAMES", "make_planner"]

# Planner class and its settings dataclass (None: the planner takes no settings), by name.
_PLANNERS: dict[str, tuple[type[Planner], type | None]] = {
    "quota": (QuotaPlanner, QuotaConfig),
    "none": (NonePlanner, None),
    "pairing": (PairingPlanner, None),
    "eplb": (EplbPlanner, EplbConfig),
    "lp_reroute": (LpReroutePlanner, LpRerouteConfig),
    "milp": (MilpPlanner, MilpConfig),
}

PLANNER_NAMES: tuple[str, ...] = tuple(_PLANNERS)
"""Names accepted by :func:`make_planner`; ``"quota"`` is the default planner."""


def make_planner(name: str, **settings) -> Planner:
    """Build the planner called ``name`` with keyword ``settings`` (fields of its config dataclass).

    ``quota`` also takes ``backend`` (``"auto"``, ``"triton"``, ``"native"`` or ``"torch"``; see
    :class:`~ultraep.planners.quota.QuotaPlanner`), which picks the implementation, not the plan.
    Raises ``ValueError`` for an unknown name and ``TypeError`` for a setting the planner does not take.
    """
    if name not in _PLANNERS:
        raise ValueError(f"unknown planner {name!r}; valid names are {list(PLANNER_NAMES)}")
    planner_class, config_class = _PLANNERS[name]
    if planner_class is QuotaPlanner and "backend" in settings:
        backend = settings.pop("backend")
        return QuotaPlanner(QuotaConfig(**_checked(name, settings, config_class)), backend=backend)
    return _build(name, planner_class, config_class, settings)


def _checked(name: str, settings: dict, config_class: type | None) -> dict:
    accepted = [field.name for field in dataclasses.fields(config_class)] if config_class is not None else []
    unknown = sorted(set(settings) - set(accepted))
    if unknown:
        takes = f"takes only {accepted}" if accepted else "takes no settings"
        raise TypeError(f"planner {name!r} got unknown settings {unknown}; it {takes}")
    return settings


def _build(name: str, planner_class: type[Planner], config_class: type | None, settings: dict) -> Planner:
    settings = _checked(name, settings, config_class)
    if config_class is None:
        return planner_class()
    return planner_class(config_class(**settings))
