"""Imported at start-up by every Python process with this folder on its PYTHONPATH (the test
session puts it there): no network but loopback, as in the test process."""

import network_guard

network_guard.install()
