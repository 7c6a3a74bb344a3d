"""In-process metrics: counters and gauges to statsd (``statsd``), system gauges (``system``)."""
