"""Metrics stack (statsd -> carbon/whisper -> graphite-web) and the run report.

`monitor.stack` installs, starts and stops the stack; `monitor.report`
draws a run's graphs; `monitor.views` names the graphs both use.
"""
