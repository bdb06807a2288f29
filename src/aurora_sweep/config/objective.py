"""The score a study minimises, `Objective`, and the names scores are logged under.

An objective is written `<target>_<score>` (`tp_seeps`, `rain_rate_rmse`), on the box's interior
(its edge zone left out, `[study] edge_margin`) with `_interior` (`tp_seeps_interior`), at a
lead other than 6 hours with the lead's suffix last (`tp_seeps_24h`, `tp_seeps_interior_24h`). `Objective.parse` reads that name once,
where it enters (the study's config, a caller's argument), and refuses a bad one; everything
after takes the value and asks it for the names derived from it (its baselines', its interval's,
its skills'), so no name is taken apart again downstream.

The other names built from parts, and read back apart, go through one pair of helpers each: a
score at a lead (`at_lead`, `split_lead`) and a variable's forgetting ratio (`forget_name`,
`forgotten`).

A leaf module: no torch, no NumPy.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from aurora_sweep.config.recipe import LEADS, OBJECTIVE_SCORES, ObjectiveScore, lead_suffix
from aurora_sweep.config.targets import TARGETS, Target

#: The suffix of a score made on the box's interior, before the lead's (`tp_seeps_interior_24h`,
#: `tp_skill_persistence_interior`).
INTERIOR = "_interior"


def at_lead(name: str, steps: int) -> str:
    """A score's name at a lead of `steps` model steps: itself at 6 h, else with `_12h`,
    `_24h`."""
    return name + lead_suffix(steps)


def split_lead(name: str) -> tuple[str, int]:
    """(the 6-hour name, the lead in model steps) of a score's name, `at_lead`'s inverse."""
    for steps in LEADS:
        suffix = lead_suffix(steps)
        if suffix and name.endswith(suffix):
            return name.removesuffix(suffix), steps
    return name, 1


def forget_name(variable: str, suffix: str = "") -> str:
    """The name of `variable`'s forgetting ratio at the lead `suffix` names
    (`forget_2t_ratio_24h`; `variable` "worst": the worst of a trial's)."""
    return f"forget_{variable}_ratio{suffix}"


def forgotten(name: str, suffix: str = "") -> str | None:
    """The variable whose forgetting ratio at the lead `suffix` names `name` is, `forget_name`'s
    inverse; None for another name (another lead's, or not a ratio)."""
    head, tail = "forget_", forget_name("", suffix).removeprefix("forget_")
    if not (name.startswith(head) and name.endswith(tail)) or len(name) <= len(head + tail):
        return None
    return name[len(head) : -len(tail)]


@dataclass(frozen=True)
class Objective:
    """A score Optuna may minimise: one of `target`'s scores (`Target.scores`) at a lead, on
    the whole box or on its interior."""

    target: str
    score: ObjectiveScore
    #: the lead it is scored at, in model steps of 6 h
    lead: int = 1
    #: scored on the box's interior alone (an edge margin in from each side), not the whole box
    interior: bool = False

    @classmethod
    def parse(cls, name: str) -> Objective:
        """`tp_seeps`, `rain_rate_rmse_24h`, `tp_seeps_interior`, ... as a value; a name of no
        target's objective raises ValueError."""
        plain, steps = split_lead(str(name))
        interior = plain.endswith(INTERIOR)
        target, _, score = plain.removesuffix(INTERIOR).rpartition("_")
        if target not in TARGETS or score not in OBJECTIVE_SCORES:
            raise ValueError(
                f"{name!r} names no target's objective: use <target>_<score> with a score among "
                f"{', '.join(OBJECTIVE_SCORES)} (optionally on the interior, _interior, and "
                "with a lead: _12h, _24h)"
            )
        return cls(target, score, steps, interior)

    @property
    def name(self) -> str:
        """The name it is logged under (`tp_seeps`, `tp_seeps_24h`)."""
        return self.of()

    def __str__(self) -> str:
        return self.name

    @property
    def variable(self) -> Target:
        """The target it scores."""
        return TARGETS[self.target]

    @property
    def rmse(self) -> bool:
        """Whether it is a root mean squared error (else a mean, SEEPS)."""
        return self.score == "rmse"

    def at(self, lead: int) -> Objective:
        """The same score at a lead of `lead` model steps."""
        return replace(self, lead=lead)

    def on(self, interior: bool) -> Objective:
        """The same score on the box's interior (True) or on the whole box."""
        return replace(self, interior=interior)

    @property
    def region(self) -> str:
        """What it is scored on, in words: "interior" or "whole box"."""
        return "interior" if self.interior else "whole box"

    def of(self, part: str = "") -> str:
        """The name of one of its derived scores at its lead: a baseline's (`of("persistence")`:
        `tp_seeps_persistence_24h`) or a bound of its interval (`of("q05")`)."""
        return self._named(f"{self.target}_{self.score}" + (f"_{part}" if part else ""))

    def skill(self, reference: str, part: str = "") -> str:
        """The name of its skill against `reference` at its lead (`tp_skill_persistence`), or of
        a bound of that skill's interval (`part` "q05", "q95")."""
        return self._named(f"{self.target}_skill_{reference}" + (f"_{part}" if part else ""))

    def _named(self, name: str) -> str:
        """`name` (a score's, at 6 h on the whole box) on its region and at its lead."""
        return at_lead(name + (INTERIOR if self.interior else ""), self.lead)
