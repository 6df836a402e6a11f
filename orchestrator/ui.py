"""`mmkd ui`: which page of the MLflow UI to open, and opening it once the server answers."""

from __future__ import annotations

__all__ = ["runs_page", "open_when_up"]


def runs_page(uri: str, base: str, pipeline: str | None) -> str:
    """The runs table of ``pipeline`` (default: the pipeline of the most recent run), not
    MLflow's home page; the home page when there is no such experiment yet."""
    from orchestrator.run_records import list_runs

    if pipeline is None:
        recent = list_runs(limit=1)
        pipeline = recent[0].pipeline if recent else None
    if pipeline is None:
        return base
    try:
        from mlflow.tracking import MlflowClient

        exp = MlflowClient(uri).get_experiment_by_name(pipeline)
    except Exception:  # noqa: BLE001 - an unreachable store: the UI will say so itself
        exp = None
    return f"{base}/#/experiments/{exp.experiment_id}/runs" if exp else base


def open_when_up(base: str, page: str) -> None:
    """Open ``page`` in a browser once the server answers (a no-op without a browser)."""
    import threading
    import urllib.request
    import webbrowser

    def wait_then_open() -> None:
        import time

        for _ in range(120):
            try:
                urllib.request.urlopen(f"{base}/health", timeout=1).read()
                webbrowser.open(page)
                return
            except Exception:  # noqa: BLE001 - not up yet
                time.sleep(0.5)

    threading.Thread(target=wait_then_open, daemon=True).start()
