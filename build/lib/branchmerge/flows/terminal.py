"""What the terminal shows of a run (Hydra's console handler; conf/config.yaml hydra.job_logging): the pipeline's
own lines (the `branchmerge` logger: one per stage event, the results), Prefect's flow-level lines, and warnings
and errors from anywhere. Everything else (third-party INFO chatter, Prefect's per-task state lines that repeat
the stage's own, Python warnings from libraries) still goes to the run's log file next to the Hydra job."""
from __future__ import annotations

import logging

SHOWN_INFO = ("branchmerge", "prefect.flow_runs")


class TerminalFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if record.name == "py.warnings":  # library warnings (logging.captureWarnings): the log file only
            return False
        if record.levelno >= logging.WARNING:
            return True
        return any(record.name == name or record.name.startswith(name + ".") for name in SHOWN_INFO)
