"""ftrun: a torchrun-compatible launcher built on ``torch.distributed.elastic``.

* :mod:`.cli`: the command line (torchrun's parser plus ftrun's flags) -> :func:`.supervisor.supervise`.
* :mod:`.supervisor`: per node, runs one :class:`.agent.FtAgent` and starts a new one if the
  rendezvous store is lost.
* :mod:`.agent`: torch's ``LocalElasticAgent`` with hang detection and a policy-driven monitor loop.
* :mod:`.policy`: the restart state machine (budget, back-off, crash-loop guard). Pure.
* :mod:`.progress`: the ranks' progress reports and the hang rule. Pure but for file reads.
* :mod:`.hang`: what a hung worker is doing (``/proc``, py-spy), read without continuing it.
* :mod:`.static`: static rendezvous with a round barrier and a fresh worker store per round.
* :mod:`.report`: ``events.jsonl`` records and the exit summary.

See ``docs/agent.md``.
"""
