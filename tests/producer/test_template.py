"""template.yaml and .example.env agree with the code (`make sam-check` proves the template deploys-valid)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from producer.settings import ProducerSettings

ROOT = Path(__file__).resolve().parents[2]


class _CfnLoader(yaml.SafeLoader):
    """Reads CloudFormation short forms (!Ref, !If, ...) as their long forms."""


def _intrinsic(loader: yaml.SafeLoader, suffix: str, node: yaml.Node) -> dict[str, Any]:
    if isinstance(node, yaml.ScalarNode):
        value: Any = loader.construct_scalar(node)
    elif isinstance(node, yaml.SequenceNode):
        value = loader.construct_sequence(node, deep=True)
    else:
        value = loader.construct_mapping(node, deep=True)  # type: ignore[arg-type]
    return {"Ref" if suffix == "Ref" else f"Fn::{suffix}": value}


_CfnLoader.add_multi_constructor("!", _intrinsic)


def template() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.load((ROOT / "template.yaml").read_text(), Loader=_CfnLoader)
    return loaded


def test_the_handler_is_imported_as_in_the_tests() -> None:
    fn = template()["Resources"]["ProducerFunction"]
    assert fn["Metadata"]["BuildMethod"] == "makefile"
    assert fn["Properties"]["Handler"] == "producer.handler.lambda_handler"
    assert fn["Properties"]["CodeUri"] == "producer/"
    makefile = (ROOT / "producer" / "Makefile").read_text()
    assert "build-ProducerFunction:" in makefile
    assert '"$(ARTIFACTS_DIR)/producer/"' in makefile


def test_sqs_is_wired_for_partial_batch_failures_and_a_dlq() -> None:
    doc = template()
    timeout = doc["Globals"]["Function"]["Timeout"]
    queue = doc["Resources"]["TaskQueue"]["Properties"]
    event = doc["Resources"]["ProducerFunction"]["Properties"]["Events"]["TaskMessages"]["Properties"]
    # AWS's advice: a message must stay invisible while up to six tries of a batch may still run
    assert queue["VisibilityTimeout"] >= 6 * timeout
    assert queue["RedrivePolicy"] == {
        "deadLetterTargetArn": {"Fn::GetAtt": "TaskDeadLetterQueue.Arn"},
        "maxReceiveCount": {"Ref": "MaxReceiveCount"},
    }
    assert event["FunctionResponseTypes"] == ["ReportBatchItemFailures"]


def test_every_producer_setting_is_passed_by_the_template_and_listed_in_example_env() -> None:
    names = {name.upper() for name in ProducerSettings.model_fields}
    variables = template()["Resources"]["ProducerFunction"]["Properties"]["Environment"]["Variables"]
    assert names <= set(variables)
    listed = set(re.findall(r"^([A-Z0-9_]+)=", (ROOT / ".example.env").read_text(), flags=re.MULTILINE))
    assert names <= listed
