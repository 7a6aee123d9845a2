#!/usr/bin/python3
"""Parse the Prometheus text exposition format on stdin with the parser of
the Prometheus Python client (Debian: python3-prometheus-client) and print
the families as JSON, for test/t/016_metrics.pl.  Exits non-zero, with the
parser's error, on anything it cannot parse."""
import json
import sys

from prometheus_client.parser import text_string_to_metric_families

families = []
for family in text_string_to_metric_families(sys.stdin.read()):
    families.append({
        "name": family.name,
        "type": family.type,
        "help": family.documentation,
        "samples": [{"name": s.name, "labels": s.labels, "value": s.value}
                    for s in family.samples],
    })
json.dump(families, sys.stdout)
