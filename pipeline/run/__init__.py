"""Running a job: the Ray job and its cluster plan, the run folder and progress, the sink,
what a run owns, the crash ledger, stage timings and the console."""
