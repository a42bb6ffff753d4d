"""Exit codes the launcher's processes use, so agents and job scripts can tell them apart.

=====  ==================================================================================
code   meaning
=====  ==================================================================================
0      training finished (``train.max_steps`` reached)
2      bad command line or configuration: fix the input, restarting will not help
3      checkpoint problem: no valid checkpoint, architecture mismatch, run directory in use
75     preempted: a verified checkpoint was written on SIGTERM/SIGUSR1; requeue the job
130    interrupted (Ctrl-C, SIGINT): stopped at once; run the same command to resume
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
