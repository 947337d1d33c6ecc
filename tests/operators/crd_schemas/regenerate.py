"""Regenerate the vendored CRD schemas (run by hand, not by the suite; needs Python 3.11 and
``pip install cloudcoil-models-keda==2.16.1.0 cloudcoil-models-prometheus-operator==0.80.1.0``).

Those PyPI packages are models generated from KEDA's and the Prometheus Operator's CRDs. Their JSON schema is
turned back into what the API server enforces: no ``null`` for an absent field, and no unknown field (an
API server with strict field validation, the kubectl default, rejects one), titles and defaults dropped.

    python tests/operators/crd_schemas/regenerate.py
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

HERE = Path(__file__).parent
DROP = {"title", "default", "description"}


def tighten(node: Any) -> Any:
    if isinstance(node, list):
        return [tighten(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {k: tighten(v) for k, v in node.items() if k not in DROP}
    branches = out.get("anyOf")
    if isinstance(branches, list):
        kept = [b for b in branches if b != {"type": "null"}]
        if len(kept) == 1:
            del out["anyOf"]
            out.update(kept[0])
        else:
            out["anyOf"] = kept
    if out.get("type") == "object" and "properties" in out and "additionalProperties" not in out:
        out["additionalProperties"] = False
    return out


def main() -> None:
    from cloudcoil.models.keda.v1alpha1 import ScaledObject, TriggerAuthentication
    from cloudcoil.models.prometheus_operator.v1 import ServiceMonitor

    for model, name in (
        (ScaledObject, "keda.sh_v1alpha1_ScaledObject.json"),
        (TriggerAuthentication, "keda.sh_v1alpha1_TriggerAuthentication.json"),
        (ServiceMonitor, "monitoring.coreos.com_v1_ServiceMonitor.json"),
    ):
        schema = tighten(model.model_json_schema(by_alias=True, mode="validation"))
        (HERE / name).write_text(json.dumps(schema, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
