"""The ``raid-fast`` command line and the jobs behind it: pipelines, the demo, reports and figures."""

from raid_fast._extras import require

require("raid_fast.app")
