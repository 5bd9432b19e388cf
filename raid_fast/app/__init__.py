"""The ``raid-fast`` command line and the jobs behind it: pipelines, the demo, reports and figures."""
