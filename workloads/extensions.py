"""What the two extension points (``workloads.divergences``, ``workloads.merging``) share.

- ``import_package_modules``: a plugin package imports every module of its own folder, so a new
  divergence or merge method is one new file that registers itself — no import list to edit.
- ``validate_own_params``: an extension declares its parameters as a pydantic model; a config
  that names the extension (``method: ties``, ``divergence: {name: skew_kl}``) carries those
  parameters flat beside the name, and they are validated by that model. Errors keep the
  field's location (so ``mmkd validate`` points at the YAML line) and name the extension.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Any, Iterable, Mapping

from pydantic import BaseModel, ConfigDict, ValidationError
from pydantic_core import InitErrorDetails, PydanticCustomError

__all__ = ["NoParams", "import_package_modules", "validate_own_params"]


class NoParams(BaseModel):
    """The parameters of an extension that has none."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def import_package_modules(package: str, path: Iterable[str], group: str | None = None
                           ) -> list[str]:
    """Import every module in a package's folder (``path`` = the package's ``__path__``), in
    name order; modules whose name starts with ``_`` are skipped. Then the modules other
    installed packages declare in the entry-point ``group`` (``mmkd.divergences``,
    ``mmkd.merge_methods``): a user's package adds a divergence or merge method the same way
    it adds a workload. Returns the module names."""
    names = sorted(m.name for m in pkgutil.iter_modules(list(path)) if not m.name.startswith("_"))
    for name in names:
        importlib.import_module(f"{package}.{name}")
    modules = [f"{package}.{n}" for n in names]
    if group:
        from orchestrator.plugin import load_entry_points

        modules += load_entry_points(group)
    return modules


def validate_own_params(owner: str, model: type[BaseModel], data: Mapping[str, Any],
                        title: str) -> BaseModel:
    """``model.model_validate(data)``; on failure a ValidationError (titled ``title``) whose
    errors keep their field locations and say ``owner`` (e.g. "merge method 'ties'") in the
    message, listing the declared parameters for an unknown one."""
    try:
        return model.model_validate(dict(data))
    except ValidationError as e:
        declared = ", ".join(model.model_fields) or "none"
        details = []
        for err in e.errors():
            if err["type"] == "extra_forbidden":
                msg = (f"{owner} has no parameter {err['loc'][-1]!r} (its parameters: "
                       f"{declared})")
            else:
                msg = f"{owner}: {err['msg']}"
            # braces would be read as format fields by PydanticCustomError
            msg = msg.replace("{", "(").replace("}", ")")
            details.append(InitErrorDetails(type=PydanticCustomError("extension_param", msg),
                                            loc=tuple(err["loc"]), input=err.get("input")))
        raise ValidationError.from_exception_data(title, details) from None
