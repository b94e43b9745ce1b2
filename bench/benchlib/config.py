"""The signing keys and the generated config of a bench's deploybus installation.

Every message on the bus is signed, as in production (docs/security.md,
docs/configuration.md "Keys and roles"): the CLI signs rollouts with a
person key that the policy allows (:data:`REQUESTER`, ``keys.signing``),
the orchestrator signs with the orchestrator key (``--key``), and each
host's daemons sign with that host's own host key, named after the host
(``hosts.<name>.signing``). One config serves every process the bench
starts on this machine, so it trusts all of these keys.
"""

from __future__ import annotations

import json
from pathlib import Path

#: The person-role key the CLI signs rollouts with (``keys.signing``); the
#: policy allows it every project and environment.
REQUESTER = "bench"
#: The orchestrator-role key: the only key agents take deploy requests from.
ORCHESTRATOR = "orchestrator"
#: Where the keys are, relative to the config file's directory.
KEYS_DIR = "keys"


def make_keys(directory: Path, hosts: list[str]) -> None:
    """NAME.key and NAME.pub in ``directory`` for :data:`REQUESTER`,
    :data:`ORCHESTRATOR` and each host. Made in this process: at N=50, one
    ``deploybus keys generate`` per key would add seconds of CLI starts."""
    from deploybus.signing import SigningKey
    for name in (REQUESTER, ORCHESTRATOR, *hosts):
        SigningKey.generate(name).save(directory)


def key_file(directory: Path, name: str) -> Path:
    """The private key file :func:`make_keys` wrote for ``name``."""
    return directory / f"{name}.key"


def with_prefix(url: str, prefix: str) -> str:
    """The bus URL with this run's own topic and queue prefix (``?prefix=``)."""
    return url + ("&" if "?" in url else "?") + f"prefix={prefix}"


def bus_yaml(url: str) -> str:
    """The config's ``bus:`` section."""
    return f"bus:\n  url: {json.dumps(url)}\n"


def keys_yaml(hosts: list[str]) -> str:
    """The config's ``keys:`` section: the CLI signs with :data:`REQUESTER`;
    :data:`REQUESTER` (person), :data:`ORCHESTRATOR` (orchestrator) and every
    host's key (host, speaking for the host of its name) are trusted; the
    policy lets :data:`REQUESTER` ask for any rollout."""
    trusted = [(REQUESTER, "person"), (ORCHESTRATOR, "orchestrator")] + \
        [(h, "host") for h in hosts]
    return ("keys:\n"
            f"  signing: {KEYS_DIR}/{REQUESTER}.key\n"
            "  trusted:\n"
            + "".join(f"    {name}: {{key: {KEYS_DIR}/{name}.pub, role: {role}}}\n"
                      for name, role in trusted)
            + f"  policy:\n    - signer: {REQUESTER}\n      projects: [\"*\"]\n"
            "      environments: [\"*\"]\n")


def hosts_yaml(hosts: list[str]) -> str:
    """The config's ``hosts:`` section: each host's deploy root and state
    directory under ``hosts/<name>/``, and the host key its daemons sign with."""
    return "hosts:\n" + "".join(
        f"  {h}: {{root: hosts/{h}/root, state_dir: hosts/{h}/state, "
        f"signing: {KEYS_DIR}/{h}.key}}\n" for h in hosts)
