"""The Redis password from AWS Secrets Manager or SSM Parameter Store (``REDIS_SECRET_ARN``).

Read once per warm Lambda container: each read costs a network round trip and counts against the
service's rate limit, and the password changes only with a rotation, which redeploys or restarts anyway.
boto3 is imported only here, on first use, so a producer without a secret starts without it.
"""

from __future__ import annotations

import json
from functools import lru_cache

from producer.errors import ConfigError


@lru_cache(maxsize=4)
def fetch_password(ref: str) -> str:
    """``ref``: a Secrets Manager ARN (plain string or JSON ``{"password": ...}``), else an SSM parameter.

    Failures are not cached, so a container retries the read on its next invocation.
    """
    import boto3
    from botocore.exceptions import BotoCoreError, ClientError

    region = _region(ref)
    try:
        if ref.startswith("arn:") and ref.split(":")[2:3] == ["secretsmanager"]:
            secrets = boto3.client("secretsmanager", region_name=region)
            return _password_from_secret(secrets.get_secret_value(SecretId=ref)["SecretString"], ref)
        ssm = boto3.client("ssm", region_name=region)
        return str(ssm.get_parameter(Name=ref, WithDecryption=True)["Parameter"]["Value"])
    except (BotoCoreError, ClientError, KeyError) as exc:
        raise ConfigError(f"REDIS_SECRET_ARN: cannot read the Redis password from {ref}: {exc}") from exc


def _password_from_secret(value: str, ref: str) -> str:
    try:
        doc = json.loads(value)
    except ValueError:
        return value
    if not isinstance(doc, dict):
        return value
    password = doc.get("password")
    if not isinstance(password, str):
        raise ConfigError(f"REDIS_SECRET_ARN: the JSON secret {ref} has no string field 'password'")
    return password


def _region(ref: str) -> str | None:
    """The region written in an ARN; for a bare parameter name, the environment's (AWS_REGION)."""
    parts = ref.split(":")
    if ref.startswith("arn:") and len(parts) > 3 and parts[3]:
        return parts[3]
    return None
