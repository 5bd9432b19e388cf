"""The detection application: backbones, the guided MoE filter and its training, synthetic
anomalies, anomaly maps, the ``Detector`` and the metrics. Needs the ``detect`` extra
(``pip install raid_fast[detect]``)."""

from raid_fast._extras import require

require("raid_fast.detect")
