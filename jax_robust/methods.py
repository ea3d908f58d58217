"""The method registry: each training method declared once, with everything others read of it.

A `Method` holds its name, its label for tables, its hyperparameters (defaults and checks),
the learning rate of the official CIFAR-10/SVHN recipe, and its objective function
(objectives.py). Validation, report labels, workdir names, sweep rows and recipes read it;
adding a method is one `register(Method(...))` call and its objective (tests/test_methods.py
adds a toy one from the test file alone).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Mapping

from jax_robust import objectives
from jax_robust.errors import UserError


@dataclasses.dataclass(frozen=True)
class HParam:
    """A hyperparameter: value >= minimum (> if `exclusive`), an int if `integer`."""

    name: str
    default: float
    minimum: float = 0.0
    exclusive: bool = False
    integer: bool = False
    help: str = ""

    def check(self, value) -> float:
        """`value` as a float (int if `integer`); UserError when it breaks the bounds."""
        ok = isinstance(value, (int, float)) and math.isfinite(value)
        ok = ok and (value > self.minimum if self.exclusive else value >= self.minimum)
        if not (ok and (not self.integer or float(value).is_integer())):
            noun = "integer" if self.integer else "number"
            word = {(0, False): "non-negative", (0, True): "positive"}.get(
                (self.minimum, self.exclusive))
            need = (f"a {word} {noun}" if word else
                    f"{'an' if self.integer else 'a'} {noun} "
                    f"{'>' if self.exclusive else '>='} {self.minimum:g}")
            raise UserError(f"{self.name} must be {need}, got {value}")
        return int(value) if self.integer else float(value)


@dataclasses.dataclass(frozen=True)
class Method:
    """A training method.

    objective: (model_fn, params, model_state, batch, key, hp) -> (loss, (model_state,
      metrics)), see objectives.py.
    label: table label, a format string over the hyperparameters, e.g. 'TRADES(b={beta:g})'.
    tag: short name for workdirs and sweep rows, a format string as `label`, e.g.
      'trades{beta:g}'; hyperparameters that neither shows are appended when not at their
      default ('gr-lam2').
    cifar_summed_lr: the official CIFAR-10 / SVHN learning rate of the summed loss (the
      official code: 1e-3 for AT, RST and LLR, 1e-2 for the others).
    """

    name: str
    objective: Callable
    label: str
    tag: str
    hparams: tuple[HParam, ...] = ()
    cifar_summed_lr: float = 1e-2

    def resolve_hparams(self, given: Mapping[str, float]) -> tuple[tuple[str, float], ...]:
        """Every hyperparameter of the method, given or default, checked, as sorted pairs."""
        known = {h.name: h for h in self.hparams}
        unknown = sorted(set(given) - set(known))
        if unknown:
            have = ", ".join(known) or "none"
            raise UserError(f"method {self.name} has no hyperparameter "
                            f"{', '.join(unknown)} (its hyperparameters: {have})")
        return tuple(sorted((n, h.check(given.get(n, h.default))) for n, h in known.items()))

    def _extras(self, values: Mapping[str, float], shown: str, fmt: str) -> str:
        return "".join(fmt.format(n=h.name, v=values[h.name]) for h in self.hparams
                       if "{" + h.name not in shown and values[h.name] != h.default)

    def format_label(self, values: Mapping[str, float]) -> str:
        """'RST(l=2)', 'GR', 'GR [lam=2]' for resolved hyperparameter `values`."""
        extra = self._extras(values, self.label, " {n}={v:g}")
        return self.label.format(**values) + (f" [{extra.strip()}]" if extra else "")

    def format_tag(self, values: Mapping[str, float]) -> str:
        """'rst2', 'natural', 'gr-lam2' for resolved hyperparameter `values`."""
        return self.tag.format(**values) + self._extras(values, self.tag, "-{n}{v:g}")


METHODS: dict[str, Method] = {}


def register(method: Method) -> Method:
    """Adds (or replaces) `method` in the registry; returns it."""
    METHODS[method.name] = method
    return method


def get(name: str) -> Method:
    if name not in METHODS:
        raise UserError(f"unknown method {name!r}; choose one of {', '.join(METHODS)}")
    return METHODS[name]


# The official code's weights (docs/official_code.md, sections 6-9).
LAM = "weight of the regulariser"
register(Method("natural", objectives.natural_objective, label="Natural", tag="natural"))
register(Method("gr", objectives.gr_objective, label="GR", tag="gr", hparams=(
    HParam("lam", 1.0, help=LAM),
    HParam("gr_h", 1.0, exclusive=True, help="finite-difference step of the gradient norm"))))
register(Method("llr", objectives.llr_objective, label="LLR", tag="llr", hparams=(
    HParam("lam", 4.0, help=LAM), HParam("mu", 3.0, help="weight of |delta . grad L|"),
    HParam("llr_steps", 2, minimum=1, integer=True, help="ascent steps finding delta")),
    cifar_summed_lr=1e-3))
register(Method("at", objectives.at_objective, label="AT", tag="at", cifar_summed_lr=1e-3))
register(Method("rst", objectives.rst_objective, label="RST(l={lam:g})", tag="rst{lam:g}",
                hparams=(HParam("lam", 1.0, help="weight of the adversarial CE"),),
                cifar_summed_lr=1e-3))
register(Method("trades", objectives.trades_objective, label="TRADES(b={beta:g})",
                tag="trades{beta:g}", hparams=(HParam("beta", 6.0, help="weight of the KL"),)))
