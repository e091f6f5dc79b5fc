#!/usr/bin/env python3
"""Asks a Prometheus server's HTTP API, for tests/interop/prometheus.sh.

    promq.py query URL EXPR      one line per sample: NAME{k="v",...} VALUE
    promq.py alerts URL          one line per alert: ALERTNAME STATE {k="v",...}
    promq.py rules URL           one line per rule: GROUP NAME HEALTH
    promq.py ready URL           exit 0 when /-/ready answers 200
    promq.py dashboard URL FILE  runs every panel query of a Grafana dashboard
                                 ($__rate_interval as 1m, other variables as
                                 .*): one line per query with its sample count;
                                 exit 1 if any query is refused

Exits 1 (with the reason on stderr) when Prometheus cannot be asked or
answers an error. Every request has a 5 s timeout.
"""

import json
import re
import sys
import urllib.parse
import urllib.request

TIMEOUT = 5


def get(url):
    with urllib.request.urlopen(url, timeout=TIMEOUT) as r:
        return r.read()


def api(base, path, **params):
    url = base.rstrip("/") + path
    if params:
        url += "?" + urllib.parse.urlencode(params)
    answer = json.loads(get(url))
    if answer.get("status") != "success":
        raise RuntimeError(f"{path}: {answer.get('error', answer)}")
    return answer["data"]


def labels(metric, skip=("__name__",)):
    inner = ",".join(f'{k}="{v}"' for k, v in sorted(metric.items()) if k not in skip)
    return "{" + inner + "}"


def main(argv):
    if len(argv) < 3:
        print(__doc__, file=sys.stderr)
        return 2
    what, base = argv[1], argv[2]
    try:
        if what == "query":
            data = api(base, "/api/v1/query", query=argv[3])
            if data["resultType"] == "scalar":
                print(data["result"][1])
            for sample in data["result"] if data["resultType"] == "vector" else []:
                name = sample["metric"].get("__name__", "")
                print(f'{name}{labels(sample["metric"])} {sample["value"][1]}')
        elif what == "alerts":
            for alert in api(base, "/api/v1/alerts")["alerts"]:
                print(alert["labels"]["alertname"], alert["state"], labels(alert["labels"], ("alertname",)))
        elif what == "rules":
            for group in api(base, "/api/v1/rules")["groups"]:
                for rule in group["rules"]:
                    print(group["name"], rule["name"], rule.get("health", "unknown"))
        elif what == "dashboard":
            with open(argv[3], encoding="utf-8") as f:
                dashboard = json.load(f)
            refused = 0
            for panel in dashboard["panels"]:
                for target in panel.get("targets", []):
                    expr = target["expr"].replace("$__rate_interval", "1m")
                    expr = re.sub(r"\$\{?\w+\}?", ".*", expr)
                    try:
                        n = len(api(base, "/api/v1/query", query=expr)["result"])
                        print(f"{n} samples: {panel['title']}: {expr}")
                    except Exception as e:  # noqa: BLE001 - report every refused query
                        refused += 1
                        print(f"REFUSED: {panel['title']}: {expr}: {e}")
            return 1 if refused else 0
        elif what == "ready":
            get(base.rstrip("/") + "/-/ready")
        else:
            print(__doc__, file=sys.stderr)
            return 2
    except Exception as e:  # noqa: BLE001 - any failure is "not yet" to the caller
        print(f"promq: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
