"""A stage's exception that Ray could not carry to the driver arrives as its message (#23 item 7)."""

from __future__ import annotations

import pytest


# -- failures Ray cannot carry (#23 item 7) -----------------------------------------------------

class _NeedsTwoArgs(ValueError):
    """Like huggingface_hub's StrictDataclassClassValidationError: pickled by its args, rebuilt
    with a different signature, so unpickling it raises."""

    def __init__(self, field, problem):
        super().__init__(f"field {field!r}: {problem}")


def test_an_exception_ray_cannot_unpickle_reaches_the_driver_as_its_message(monkeypatch):
    import orchestrator.executor as executor
    from orchestrator.plugin import StageError

    assert not executor._travels(_NeedsTwoArgs("layer_types", "2 entries, 1 layer"))
    assert executor._travels(ValueError("plain"))

    def failing(payload, reporter):
        raise _NeedsTwoArgs("layer_types", "num_hidden_layers is 1 but there are 2 entries")

    monkeypatch.setattr(executor, "_execute_stage", failing)
    with pytest.raises(StageError) as err:
        executor.execute_stage({}, None)
    text = str(err.value)
    assert "_NeedsTwoArgs" in text and "num_hidden_layers is 1 but there are 2" in text
    monkeypatch.setattr(executor, "_execute_stage", lambda p, r: (_ for _ in ()).throw(
        KeyError("kept as it is")))
    with pytest.raises(KeyError):
        executor.execute_stage({}, None)
