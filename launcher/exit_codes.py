"""Exit codes of ``launcher/run.py`` and of every ``python -m launcher.ckpt`` subcommand.

Agents and job scripts tell outcomes apart by them; the two programs use the same table.

=====  ==================================================================================
code   meaning
=====  ==================================================================================
0      done: training finished (``train.max_steps`` reached), or the tool did its work
1      an unexpected internal error (a bug: the traceback says where; please report it)
2      bad command line, configuration, data or input path (a value out of range, a path
       that does not exist, an output that already exists, a bad signing key): fix the
       input, restarting will not help
3      checkpoint or run-directory problem: no checkpoint verifies, architecture mismatch,
       a checkpoint's index refused, the run directory in use by a live job, read-only or
       full (the message names the file); ``ckpt verify``: a checkpoint does not verify
75     preempted: a verified checkpoint was written on SIGTERM/SIGUSR1; requeue the job
130    interrupted (Ctrl-C, SIGINT): stopped at once; run the same command to resume (``run.py`` and ``ckpt``)
=====  ==================================================================================
"""

OK = 0
CONFIG_ERROR = 2
CHECKPOINT_ERROR = 3
PREEMPTED = 75  # EX_TEMPFAIL: "try again later"
INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for a program ended by Ctrl-C

# Exits that mean "do not restart locally": restarting reproduces the same error, or
# (PREEMPTED) the job script is about to requeue the whole job.
NO_RESTART = frozenset({CONFIG_ERROR, CHECKPOINT_ERROR, PREEMPTED})
