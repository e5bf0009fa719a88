"""Settings: every value survives the trip to a supervised worker's command line."""

from __future__ import annotations

from pathlib import Path

from service.config import Settings


def test_settings_travel_to_workers_unchanged(tmp_path: Path) -> None:
    given = Settings.from_env({
        "CONVSERVE_STORE": str(tmp_path), "CONVSERVE_MODELS": "digits,lenet5",
        "CONVSERVE_FORMATS": "png,jpeg", "CONVSERVE_THREADS": "2", "CONVSERVE_WATCH": "yes",
        "CONVSERVE_MAX_DELAY_MS": "2.5", "CONVSERVE_API_KEY": "k", "CONVSERVE_WORKERS": "3",
    })  # fmt: skip
    for settings in (given, Settings()):
        assert Settings.from_env(settings.to_env()) == settings
    assert given.to_env()["CONVSERVE_DEFAULT_MODEL"] == ""  # unset stays unset
