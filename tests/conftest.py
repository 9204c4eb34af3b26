"""Shared fixtures: tiny fixture sets (base + experts on disk) written once per test session.

``fixture_sets`` is a mapping layout -> :class:`segmoe_lab.testing.FixtureSet` that writes a
layout's set the first time a test asks for it, so a test run that only needs SD 1.5 never
builds SDXL. Each set has 2 experts, diffusers folders and single-file checkpoints.
"""
import os
from collections.abc import Mapping

# Tests never touch the network: a missing local file must fail, not download.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from segmoe_lab.testing import LAYOUTS, write_fixture_set  # noqa: E402

torch.set_num_threads(1)  # the machine's 2 cores are shared by pytest-xdist workers


class LazyFixtureSets(Mapping):
    """layout -> FixtureSet, written under a session temp folder on first access."""

    def __init__(self, tmp_path_factory, n_experts: int = 2):
        self._factory, self._n, self._sets = tmp_path_factory, n_experts, {}

    def __getitem__(self, layout):
        if layout not in LAYOUTS:
            raise KeyError(f"unknown layout {layout!r}; choose one of {LAYOUTS}")
        if layout not in self._sets:
            root = self._factory.mktemp(f"fixtures_{layout}")
            self._sets[layout] = write_fixture_set(root, layout, n_experts=self._n, seed=0, single_file=True)
        return self._sets[layout]

    def __iter__(self):
        return iter(LAYOUTS)

    def __len__(self):
        return len(LAYOUTS)


@pytest.fixture(scope="session")
def fixture_sets(tmp_path_factory):
    """All layouts' fixture sets (written lazily): ``fixture_sets["sdxl"].experts``."""
    return LazyFixtureSets(tmp_path_factory)


@pytest.fixture(scope="session")
def sd15_set(fixture_sets):
    """The SD 1.5 fixture set."""
    return fixture_sets["sd15"]


@pytest.fixture(scope="session")
def sdxl_set(fixture_sets):
    """The SDXL fixture set."""
    return fixture_sets["sdxl"]


@pytest.fixture(scope="session", params=LAYOUTS)
def layout_set(request, fixture_sets):
    """Each layout's fixture set in turn (a test using it runs once per layout)."""
    return fixture_sets[request.param]


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a connection fails the test: "fails at once" means "never dialled out"."""
    import socket

    def refuse(self, address, *args, **kwargs):
        raise AssertionError(f"the code under test tried to connect to {address}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)


@pytest.fixture
def hang_guard():
    """Run ``fn`` in a thread and fail if it is still running after ``limit`` seconds.

    A hang detector, not a speed check: the limit is many times what the call needs (speed is
    measured in ``benchmarks/``), so only a call that waits on a silent server forever trips it.
    """
    import threading

    def run(fn, limit: float = 60.0):
        box = {}

        def target():
            try:
                box["value"] = fn()
            except BaseException as err:  # noqa: BLE001  handed back to the test
                box["error"] = err

        worker = threading.Thread(target=target, daemon=True)
        worker.start()
        worker.join(limit)
        assert not worker.is_alive(), f"still waiting after {limit:g} s: the call hangs"
        if "error" in box:
            raise box["error"]
        return box.get("value")

    return run
