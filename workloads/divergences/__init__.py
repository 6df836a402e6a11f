"""KD divergences, one file each, in a registry the losses look names up in.

A divergence compares the teacher's and the student's next-token distributions at one position.
It is registered with

- ``rows(log_p_s, log_p_t, **params) -> (C,)``: the per-row divergence of ``(C, V)``
  log-probabilities (student, teacher), written with plain torch ops so autograd can
  differentiate it. This is the definition: ``kd_divergence_reference``, ``topk_kd_divergence``
  and the tests use it.
- optionally ``grads(s, t, need_s, need_t, **params) -> (D (C,), dD/ds or None, dD/dt or None)``:
  the same value and its closed-form gradients w.r.t. the (tempered) *logits* ``s``, ``t``
  ``(C, V)``. ``s`` and ``t`` are scratch buffers the caller gives away (work in place). The
  chunked kernel (``kernels/chunked.py``) uses it when present; without it the kernel
  differentiates ``rows`` with autograd one chunk at a time (still chunked, so memory stays
  bounded). Measured (B=2, T=1024, V=32k, fp32, CPU, one thread; memory beyond the inputs and
  the logits' gradient): ``fkl``'s closed form 98 MB / 2.3 s, the same ``rows`` through
  autograd 129 MB / 2.4 s, ``skew_kl`` (autograd) 176 MB / 3.7 s; unchunked: 1281 MB.
- optionally ``pointwise(log_p_s, log_p_t, **params) -> (f, df/dlog_p_s, df/dlog_p_t)``: the
  divergence as a sum over the vocabulary of an elementwise ``f`` of the two log-probabilities
  (``D = sum_v f``), with f's elementwise partial derivatives, written with elementwise torch ops
  only. A divergence with this form runs in the fused kernel (``workloads/kernels/``): one pass
  over each row block for the values and the row sums, one for the gradients
  (``dD/ds = tau * (f_s - p * sum_v f_s)``, the same with q for the teacher). The built-ins also
  have a Triton version of it (``kernels/triton_divergence.py``) used on CUDA; a divergence
  without ``pointwise`` runs in the chunked kernel, with a note in the log.
- ``params``: a pydantic model of the divergence's own parameters (default: none). Configs
  name a divergence as ``fkl`` or ``{name: skew_kl, alpha: 0.1}``; the parameters are validated
  by that model and passed to ``rows``/``grads`` as keyword arguments.

Names are snake_case; an unknown name is an error listing the registered ones.

Extending — a new divergence is one new file in this folder (every module here is imported
when the package is), e.g. ``workloads/divergences/my_div.py``::

    from pydantic import BaseModel, ConfigDict, Field
    from workloads.divergences import register_divergence

    class MyParams(BaseModel):
        model_config = ConfigDict(extra="forbid", frozen=True)
        beta: float = Field(0.5, gt=0, lt=1, description="...")

    def my_rows(log_p_s, log_p_t, *, beta):  # (C, V), (C, V) -> (C,)
        ...

    register_divergence("my_div", my_rows, params=MyParams, description="...")

and ``distill`` takes ``divergence: {name: my_div, beta: 0.3}``. ``skew_kl.py`` is such a file.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping

from pydantic import BaseModel, ConfigDict, ValidationError, model_validator
from pydantic_core import InitErrorDetails, PydanticCustomError

from workloads.extensions import NoParams, import_package_modules, validate_own_params

__all__ = ["Divergence", "DivergenceSpec", "UnknownDivergenceError", "DIVERGENCES",
           "register_divergence", "get_divergence", "list_divergences", "resolve_divergence"]


class UnknownDivergenceError(ValueError):
    """A divergence name nobody registered; the message lists the registered ones."""


@dataclass(frozen=True)
class Divergence:
    name: str
    rows: Callable[..., Any]                 # rows(log_p_s, log_p_t, **params) -> (C,)
    grads: Callable[..., Any] | None = None  # grads(s, t, need_s, need_t, **params)
    params: type[BaseModel] = NoParams
    description: str = ""
    defaults: dict[str, Any] | None = None  # params() dumped (None: a parameter is required)
    # pointwise(log_p_s, log_p_t, **params) -> (f, f_s, f_t): D = sum_v f (the fused kernel)
    pointwise: Callable[..., Any] | None = None


DIVERGENCES: dict[str, Divergence] = {}


def register_divergence(name: str, rows: Callable[..., Any],
                        grads: Callable[..., Any] | None = None,
                        params: type[BaseModel] = NoParams, description: str = "",
                        pointwise: Callable[..., Any] | None = None) -> Divergence:
    """Register divergence ``name``; see the package docstring for ``rows``/``grads``."""
    if not name.replace("_", "").isalnum() or name.lower() != name:
        raise ValueError(f"divergence names are snake_case, got {name!r}")
    if name in DIVERGENCES and DIVERGENCES[name].rows is not rows:
        raise ValueError(f"divergence {name!r} registered twice")
    try:
        defaults = params().model_dump()
    except ValidationError:
        defaults = None
    div = Divergence(name, rows, grads, params, description, defaults, pointwise)
    DIVERGENCES[name] = div
    return div


def _unknown(name: Any) -> str:
    return (f"unknown divergence kind {name!r}; registered: {', '.join(sorted(DIVERGENCES))} "
            "(a new one is a file in workloads/divergences/)")


def get_divergence(name: str) -> Divergence:
    try:
        return DIVERGENCES[name]
    except (KeyError, TypeError):
        raise UnknownDivergenceError(_unknown(name)) from None


def list_divergences() -> list[Divergence]:
    return [DIVERGENCES[k] for k in sorted(DIVERGENCES)]


class DivergenceSpec(BaseModel):
    """A registered divergence and its parameters, flat: ``fkl`` (a plain name: default
    parameters) or ``{name: skew_kl, alpha: 0.1}``. The parameters are validated by the
    divergence's own model and stored with defaults filled in (so ``model_dump`` is canonical).
    """

    model_config = ConfigDict(extra="allow", frozen=True)
    name: str

    @model_validator(mode="wrap")
    @classmethod
    def _own_params(cls, data: Any, handler: Any) -> Any:
        if isinstance(data, str):
            data = {"name": data}
        if isinstance(data, Mapping) and isinstance(data.get("name"), str):
            name = data["name"]
            if name not in DIVERGENCES:
                err = InitErrorDetails(type=PydanticCustomError("unknown_divergence",
                                                                _unknown(name)),
                                       loc=("name",), input=name)
                raise ValidationError.from_exception_data(cls.__name__, [err])
            div = DIVERGENCES[name]
            own = validate_own_params(f"divergence {name!r}", div.params,
                                      {k: v for k, v in data.items() if k != "name"},
                                      cls.__name__)
            data = {"name": name, **own.model_dump()}
        return handler(data)

    @property
    def divergence(self) -> Divergence:
        return get_divergence(self.name)

    @property
    def params(self) -> dict[str, Any]:
        """The validated parameters, as keyword arguments for ``rows``/``grads``."""
        return dict(self.model_extra or {})


def resolve_divergence(kind: str | Mapping[str, Any] | DivergenceSpec
                       ) -> tuple[Divergence, dict[str, Any]]:
    """``(divergence, params)`` for ``"fkl"``, ``{"name": "skew_kl", "alpha": 0.2}`` or a
    ``DivergenceSpec``. Raises UnknownDivergenceError / a pydantic ValidationError (both
    ValueErrors) naming the divergence and the field."""
    if isinstance(kind, str):  # the hot path: no pydantic per call
        div = get_divergence(kind)
        if div.defaults is not None:
            return div, div.defaults
        kind = {"name": kind}  # let the model say which parameter is missing
    if isinstance(kind, Mapping):
        if not isinstance(kind.get("name"), str):
            raise UnknownDivergenceError(f"a divergence given as a mapping needs `name`: one of "
                                         f"{', '.join(sorted(DIVERGENCES))}; got {dict(kind)}")
        get_divergence(kind["name"])
        kind = DivergenceSpec.model_validate(kind)
    if isinstance(kind, DivergenceSpec):
        return kind.divergence, kind.params
    raise UnknownDivergenceError(_unknown(kind))


import_package_modules(__name__, __path__, group="mmkd.divergences")
