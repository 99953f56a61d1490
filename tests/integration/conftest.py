"""Integration tests: the real `ramp` CLI as processes in a network-namespace lab.

See `ramp.testing.lab` for the network. Every test here is marked `netns`; the directory is
skipped only where namespaces cannot be made (not root, no iproute2).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from ramp.net.netns import reap_stale, unavailable_reason
from ramp.testing.lab import Lab, Payload, make_payload

HERE = Path(__file__).resolve().parent
_active_labs: list[Lab] = []


@functools.cache
def _skip_reason() -> str | None:
    # Only the missing privilege or kernel support skips; a missing tool (curl, nft, ss) is a
    # broken test machine and fails loudly instead.
    return unavailable_reason()


def _is_mine(item: pytest.Item) -> bool:
    return HERE in Path(str(item.path)).resolve().parents


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    mine = [item for item in items if _is_mine(item)]
    if not mine:
        return
    reason = _skip_reason()
    for item in mine:
        item.add_marker(pytest.mark.netns)
        if reason:
            item.add_marker(pytest.mark.skip(reason=f"needs network namespaces: {reason}"))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    if report.failed and _is_mine(item):
        for lab in _active_labs:
            report.sections.append((f"ramp lab logs ({lab.workdir})", lab.log_tails()))


@pytest.fixture(scope="session", autouse=True)
def _reap_leftovers() -> None:
    """Namespaces of earlier runs that were killed before they could clean up."""
    if _skip_reason() is None:
        reap_stale()


@pytest.fixture(scope="session")
def payload(tmp_path_factory: pytest.TempPathFactory) -> Payload:
    """The files the HTTP origin serves: a 100 MiB random file and a small one."""
    return make_payload(tmp_path_factory.mktemp("payload"))


@contextlib.contextmanager
def open_lab(
    workdir: Path,
    payload: Payload,
    *,
    standard: bool,
    lab_kwargs: dict[str, Any] | None = None,
    **start_kwargs: Any,
) -> Iterator[Lab]:
    """A lab whose logs are shown when a test fails; `standard` also starts edge + connector
    (`lab_kwargs` go to `Lab`, `start_kwargs` to `Lab.start_standard`)."""
    lab = Lab(workdir, payload=payload, **(lab_kwargs or {}))
    _active_labs.append(lab)
    try:
        with lab:
            if standard:
                try:
                    lab.start_standard(**start_kwargs)
                except Exception as e:
                    pytest.fail(f"could not start the standard lab: {e}\n\n{lab.log_tails()}")
            yield lab
    finally:
        _active_labs.remove(lab)


@pytest.fixture
def bare_lab(tmp_path: Path, payload: Payload) -> Iterator[Lab]:
    """The network and its origins; no edge, no connector."""
    with open_lab(tmp_path, payload, standard=False) as lab:
        yield lab


@pytest.fixture
def lab(tmp_path: Path, payload: Payload) -> Iterator[Lab]:
    """A fresh lab with an edge, tunnel "corp" routed for 198.51.100.0/24 and one connector."""
    with open_lab(tmp_path, payload, standard=True) as lab:
        yield lab


@pytest.fixture(scope="module")
def shared_lab(tmp_path_factory: pytest.TempPathFactory, payload: Payload) -> Iterator[Lab]:
    """Like `lab`, but one per test module: for tests that leave it as they found it."""
    with open_lab(tmp_path_factory.mktemp("lab"), payload, standard=True) as lab:
        yield lab


@pytest.fixture(scope="session")
def lab_opener() -> Callable[..., contextlib.AbstractContextManager[Lab]]:
    """`open_lab` for tests that need a lab set up their own way."""
    return open_lab
