"""The parts of the benches under bench/, one concept per module.

``bench/fanout.py`` is the command line and the run; ``bench/dispatch.py``
and ``bench/idle_agent.py`` reuse these parts, so that every bench sets
deploybus up the same way:

* :mod:`benchlib.common`: paths, the project's and environment's names, the
  error type and running commands;
* :mod:`benchlib.source`: the generated git project and its fresh tags;
* :mod:`benchlib.measure`: wall time and CPU of a run (``/proc``);
* :mod:`benchlib.runtime`: the deploybus command benched (``bench/.venv-agent``);
* :mod:`benchlib.keys`: the signing keys and the config's ``keys:`` and
  ``hosts:`` sections (every message signed, as in production);
* :mod:`benchlib.cluster`: one orchestrator and N agents on the broker;
* :mod:`benchlib.baselines`: Ansible and the shell floor;
* :mod:`benchlib.report`: the table's rows, the printed report and its JSON line.
"""
