"""Fixtures for the Debian packages (packaging/README.md).

``built_debs`` is the pair of packages ``make deb`` makes, built once per
session from this tree: ``{"agent": Path, "server": Path}``. Tests outside
this folder (tests/puppet) get the same build with::

    from tests.packaging.conftest import built_debs  # noqa: F401

(the build is cached in the process, so importing the fixture elsewhere
does not build twice).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.packaging import debs


@pytest.fixture(scope="session")
def built_debs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """deploybus-agent and deploybus-server .debs of this tree, version
    ``<__version__>-1``, built once per session (about 30 s)."""
    return debs.build(tmp_path_factory.mktemp("debs"))


@pytest.fixture(scope="session")
def old_agent_deb(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """deploybus-agent built from the same tree with a lower version
    (``<__version__>-0~pkgtest1``, through DEB_VERSION): what an upgrade
    starts from."""
    return debs.build(tmp_path_factory.mktemp("debs-old"),
                      deb_version=debs.version() + debs.OLD_SUFFIX, agent_only=True)["agent"]


@pytest.fixture(scope="session")
def packaging_tools() -> Iterator[None]:
    debs.require_tools()
    yield
