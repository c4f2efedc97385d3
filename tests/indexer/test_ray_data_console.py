"""A quiet ingest keeps Ray Data's console at ERROR even after Ray Data rebuilds its log handlers, which it does
whenever a context with another dataset logger becomes current (a rebuilt handler once printed "Dataset ...
execution finished" on a quiet ingest's stderr). Real Ray Data logging, no Ray cluster needed."""
import logging
import os

import pytest


@pytest.fixture
def ray_data_logging():
    from ray.data._internal.logging import configure_logging

    before = os.environ.pop("RAY_DATA_LOGGING_CONFIG", None)
    yield configure_logging
    os.environ.pop("RAY_DATA_LOGGING_CONFIG", None)
    if before is not None:
        os.environ["RAY_DATA_LOGGING_CONFIG"] = before
    configure_logging()  # Ray Data's own config again for the rest of the session


def _console_level():
    return [h.level for h in logging.getLogger("ray.data").handlers if h.name == "console"]


def test_quiet_console_survives_ray_data_rebuilding_its_handlers(ray_data_logging):
    from indexer.job import _quiet_ray_data_console

    ray_data_logging()
    assert _console_level() == [logging.INFO]  # Ray Data's default: INFO lines on the console
    _quiet_ray_data_console(True)
    assert _console_level() == [logging.ERROR]
    ray_data_logging()  # what DataContext._set_current does when a dataset's logger changes
    assert _console_level() == [logging.ERROR]
    assert os.path.isfile(os.environ["RAY_DATA_LOGGING_CONFIG"])


def test_verbose_ingest_and_a_users_own_config_are_left_alone(ray_data_logging, tmp_path):
    from indexer.job import _quiet_ray_data_console

    ray_data_logging()
    _quiet_ray_data_console(False)  # -v: Ray Data's lines stay
    assert "RAY_DATA_LOGGING_CONFIG" not in os.environ and _console_level() == [logging.INFO]
    own = tmp_path / "mine.yaml"
    own.write_text("version: 1\n")
    os.environ["RAY_DATA_LOGGING_CONFIG"] = str(own)
    _quiet_ray_data_console(True)
    assert os.environ["RAY_DATA_LOGGING_CONFIG"] == str(own)
