"""KD terms, one file each, in a registry the distill loss looks names up in.

The distill objective is the student's cross-entropy plus a weighted sum of terms::

    L = CE + sum_i w_i * term_i

The built-ins are LLaVA-KD's three, weighted by the stage's ``alpha``, ``beta`` and ``gamma``
(``res.py``: L_res, ``vis.py``: L_vis, ``rel.py``: L_rel). Any other registered term is named
in the stage's ``terms`` with its weight, and its parameters if it has any — among mmkd's own,
``uld.py`` and ``span.py``, the two that distil across tokenizers::

    terms: {argmax_ce: 0.5}
    terms: {argmax_ce: {weight: 0.5, min_confidence: 0.3}}

and is logged as ``l_<name>`` beside ``l_res``, ``l_vis`` and ``l_rel``.

A term is registered with

- ``loss(x: KDBatch, **params) -> scalar tensor``: what it adds, computed from the student's
  logits ``x.student`` and the teacher's side of the batch, read through ``x`` — the same calls
  whether the teacher runs in the worker (``online``), was stored by a ``teacher_logits`` stage
  (``offline``) or answers from a Ray service (``service``):

  * ``x.divergence_at(where)``: the stage's divergence (its name, parameters, temperature and
    chunking) between the two models' next-token distributions, averaged over the ``where``
    positions: ``"response"`` (the positions CE trains on) or ``"image"`` (image tokens);
  * ``x.relation()``: LLaVA-KD's relation loss between the two models' image-token Gram
    matrices;
  * ``x.rows(where)``: the ``(N, V)`` student and teacher logit rows at those positions, for a
    term that needs the teacher's whole distribution (stored teachers keep their top-k only, so
    such a term runs where k covers the vocabulary: online, or a service without ``top_k``);
  * ``x.replies()``: both models' rows at their own reply positions with the alignment of the
    two tokenizations (``teacher_rows.Replies``) — what a term needs to work across
    tokenizers (``uld.py``, ``span.py``); for one tokenizer, row i pairs with row i.

- ``needs``: which of ``"response"``, ``"image"``, ``"relation"``, ``"replies"`` it reads. A
  teacher that tokenizes the rows its own way (``teacher_inputs: own``) has response positions
  only, so a stage with a term that needs ``"image"`` or ``"relation"`` is refused at start,
  naming it; a teacher with another tokenizer (``teacher_inputs: cross``) serves ``"replies"``
  only.
- ``params``: a pydantic model of its own parameters (default: none), validated where the
  stage's config is.

Names are snake_case; an unknown name is an error listing the registered ones.

Extending — a new term is one file that registers itself: a file in this folder, or a module
of your own package named in its entry-point group ``mmkd.kd_terms`` (or in ``MMKD_PLUGINS``)::

    from workloads.kd_terms import register_kd_term

    def argmax_ce(x):  # cross-entropy of the student on the teacher's top token
        import torch.nn.functional as F

        s, t = x.rows("response")
        return F.cross_entropy(s.float(), t.argmax(-1)) if len(s) else s.sum() * 0.0

    register_kd_term("argmax_ce", argmax_ce, needs=("response",))

``tests/plugin/mmkd_test_plugins/argmax_ce.py`` is that file with a parameter.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable, Literal, Mapping

from pydantic import BaseModel, ValidationError

from workloads.extensions import NoParams, import_package_modules, validate_own_params

__all__ = ["KDTerm", "KDBatch", "KDTermError", "KD_TERMS", "BUILTIN_WEIGHTS", "register_kd_term",
           "get_kd_term", "list_kd_terms", "term_spec", "resolve_terms", "builtin_weights",
           "reading_images", "across_tokenizers", "objective"]

Need = Literal["response", "image", "relation", "replies"]
Where = Literal["response", "image"]
# the built-in terms and the stage parameter that weighs each (the paper's names)
BUILTIN_WEIGHTS = {"res": "alpha", "vis": "beta", "rel": "gamma"}


class KDTermError(ValueError):
    """An unknown term, bad parameters, or a term its teacher cannot serve."""

    deterministic = True  # Ray Train raises it at once (workloads/errors.py)


@dataclass(frozen=True)
class KDTerm:
    name: str
    loss: Callable[..., Any]          # loss(x: KDBatch, **params) -> scalar tensor
    needs: frozenset[str]
    params: type[BaseModel] = NoParams
    description: str = ""


KD_TERMS: dict[str, KDTerm] = {}


def register_kd_term(name: str, loss: Callable[..., Any], *, needs: Iterable[Need],
                     params: type[BaseModel] = NoParams, description: str = "") -> KDTerm:
    """Register KD term ``name``; see the package docstring."""
    if not name.replace("_", "").isalnum() or name.lower() != name:
        raise ValueError(f"KD term names are snake_case, got {name!r}")
    if name in KD_TERMS and KD_TERMS[name].loss is not loss:
        raise ValueError(f"KD term {name!r} registered twice")
    needs = frozenset(needs)
    unknown = needs - {"response", "image", "relation", "replies"}
    if unknown:
        raise ValueError(f"KD term {name!r}: unknown needs {sorted(unknown)} (response, image, "
                         f"relation, replies)")
    term = KDTerm(name, loss, needs, params, description)
    KD_TERMS[name] = term
    return term


def get_kd_term(name: str) -> KDTerm:
    try:
        return KD_TERMS[name]
    except (KeyError, TypeError):
        raise KDTermError(
            f"unknown KD term {name!r}; registered: {', '.join(sorted(KD_TERMS))} (a new one "
            f"is a file in workloads/kd_terms/ or a module in the entry-point group "
            f"mmkd.kd_terms)") from None


def list_kd_terms() -> list[KDTerm]:
    return [KD_TERMS[k] for k in sorted(KD_TERMS)]


def term_spec(name: str, value: Any) -> dict[str, Any]:
    """One entry of a stage's ``terms`` (a weight, or ``{weight, <params>}``) checked against
    the registry and canonical: ``{"weight": w, <every parameter, defaults filled in>}``."""
    if name in BUILTIN_WEIGHTS:
        raise KDTermError(f"terms: {name!r} is a built-in term; its weight is the stage's "
                          f"`{BUILTIN_WEIGHTS[name]}`")
    term = get_kd_term(name)
    data = dict(value) if isinstance(value, Mapping) else {"weight": value}
    weight = data.pop("weight", None)
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or weight < 0:
        raise KDTermError(f"terms: {name!r} needs a weight, a number >= 0 (`{name}: 0.5` or "
                          f"`{name}: {{weight: 0.5, ...}}`); got {weight!r}")
    try:
        params = validate_own_params(f"KD term {name!r}", term.params, data, "terms")
    except ValidationError as e:
        raise KDTermError("; ".join(f"terms.{name}.{'.'.join(map(str, err['loc']))}: "
                                    f"{err['msg']}" for err in e.errors())) from None
    return {"weight": float(weight), **params.model_dump()}


def resolve_terms(builtin: Mapping[str, float], extra: Mapping[str, Any]
                  ) -> dict[str, dict[str, Any]]:
    """The stage's terms as ``{name: {"weight": w, "params": {...}}}``: the built-ins with the
    weights ``builtin`` gives them (``{"res": alpha, ...}``), then ``extra`` — the ``terms``
    mapping of the config (``term_spec``). Terms of weight 0 are left out."""
    out = {name: {"weight": float(w), "params": {}} for name, w in builtin.items() if w > 0}
    for name, value in extra.items():
        params = term_spec(name, value)
        weight = params.pop("weight")
        if weight > 0:
            out[name] = {"weight": weight, "params": params}
    return out


def builtin_weights(owner: Any) -> dict[str, float]:
    """``{"res": owner.alpha, "vis": owner.beta, "rel": owner.gamma}``: the built-ins' weights
    as a stage config (or the loss it builds) holds them."""
    return {name: float(getattr(owner, param)) for name, param in BUILTIN_WEIGHTS.items()}


def reading_images(names: Iterable[str]) -> list[str]:
    """The terms among ``names`` that read image positions (``needs`` image or relation):
    teacher and student must then encode images alike."""
    return [n for n in names if get_kd_term(n).needs & {"image", "relation"}]


def across_tokenizers(names: Iterable[str]) -> list[str]:
    """The terms among ``names`` that work across tokenizers (they read ``replies`` only)."""
    return [n for n in names if get_kd_term(n).needs <= {"replies"}]


def objective(ce: Any, values: Mapping[str, Any], weights: Mapping[str, float]
              ) -> tuple[Any, dict[str, Any]]:
    """``total = ce + sum weights[n] * values[n]``, and ``{"loss", "ce", "l_<n>"...}`` detached
    for logging (only the terms given)."""
    total = ce
    logged = {"ce": ce.detach()}
    for name, value in values.items():
        total = total + weights[name] * value
        logged[f"l_{name}"] = value.detach()
    logged["loss"] = total.detach()
    return total, logged


@dataclass
class KDBatch:
    """What a term sees of one micro-batch: the student's logits (cut to the vocabulary both
    models share) and the teacher's side, whichever its placement (``teacher_rows.py``)."""

    student: Any                # (B, T, V) logits
    teacher: Any                # DenseRows | PairedRows | StoredRows
    divergence: Any             # the stage's divergence (name or spec)
    temperature: float
    chunk_size: int | None
    term: str = ""              # the term being computed, for messages

    def divergence_at(self, where: Where) -> Any:
        return self.teacher.divergence(self.student, where, self.divergence, self.temperature,
                                       self.chunk_size)

    def relation(self) -> Any:
        return self.teacher.relation(self.student)

    def rows(self, where: Where) -> tuple[Any, Any]:
        return self.teacher.rows(self.student, where, self.term)

    def replies(self) -> Any:
        return self.teacher.replies(self.student, self.term)


import_package_modules(__name__, __path__, group="mmkd.kd_terms")
