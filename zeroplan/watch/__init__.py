"""Watching a run: NVML and host sampling (monitor), the run folder (runlog), alerts, the
dashboard's faces, its loop (loop: ``run_dashboard`` for launch, ``watch_once``) and the
after-the-fact report. Reads a run; never writes into a finished one."""
