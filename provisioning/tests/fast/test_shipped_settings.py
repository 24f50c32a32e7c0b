"""The settings as shipped, not as the tests change them."""

import pytest
from django.utils.module_loading import import_string

import portal.settings as shipped


@pytest.mark.parametrize("alias", sorted(shipped.STOCKROOM_BACKENDS))
def test_every_configured_backend_accepts_its_options(alias):
    """A backend's OPTIONS in settings are its constructor's keywords: an option it does not take
    would fail the first request that uses it, not the portal's start."""
    config = shipped.STOCKROOM_BACKENDS[alias]
    backend = import_string(config["BACKEND"])(alias, **config["OPTIONS"])
    assert backend.alias == alias
