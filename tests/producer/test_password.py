"""The Redis password from Secrets Manager or SSM (moto), used on a password-protected redis-server."""

from __future__ import annotations

import json

import boto3
import pytest
import redis

from producer.handler import lambda_handler

from .conftest import ProducerEnv
from .helpers import api_body, load_event


def private_jobs(port: int, queue: str) -> list[str]:
    client = redis.Redis(port=port, password="x", decode_responses=True)
    try:
        return [json.loads(raw)["task_id"] for raw in client.lrange(queue, 0, -1)]
    finally:
        client.close()


def test_a_json_secret_unlocks_redis_and_is_read_once(
    producer_env: ProducerEnv, aws: None, private_redis: int
) -> None:
    # GIVEN a Redis that requires a password, and the password in a Secrets Manager JSON secret
    secrets = boto3.client("secretsmanager", region_name="us-east-1")
    arn = secrets.create_secret(Name="gpuq/redis", SecretString=json.dumps({"password": "x", "user": "u"}))[
        "ARN"
    ]
    producer_env.set(REDIS_URL=f"redis://127.0.0.1:{private_redis}/0", REDIS_SECRET_ARN=arn)
    # WHEN a task is enqueued THEN it lands in the protected Redis
    first = lambda_handler(load_event("direct_single_seed"), None)
    assert private_jobs(private_redis, producer_env.queues[0]) == first["task_ids"]
    # AND the secret was read once per container: with it gone, the warm container still enqueues
    secrets.delete_secret(SecretId=arn, ForceDeleteWithoutRecovery=True)
    second = lambda_handler(load_event("direct_single_seed"), None)
    assert private_jobs(private_redis, producer_env.queues[0]) == first["task_ids"] + second["task_ids"]


def test_a_plain_string_secret_with_the_redis_host_settings(
    producer_env: ProducerEnv, aws: None, private_redis: int
) -> None:
    secrets = boto3.client("secretsmanager", region_name="us-east-1")
    arn = secrets.create_secret(Name="gpuq/redis-plain", SecretString="x")["ARN"]
    producer_env.monkeypatch.delenv("REDIS_URL")
    producer_env.set(REDIS_HOST="127.0.0.1", REDIS_PORT=str(private_redis), REDIS_SECRET_ARN=arn)
    answer = lambda_handler(load_event("direct_single_seed"), None)
    assert private_jobs(private_redis, producer_env.queues[0]) == answer["task_ids"]


@pytest.mark.slow  # 10 s on a loaded 2-core machine (make test-fast stays under a minute)
def test_an_ssm_secure_string_parameter(producer_env: ProducerEnv, aws: None, private_redis: int) -> None:
    ssm = boto3.client("ssm", region_name="us-east-1")
    ssm.put_parameter(Name="/gpuq/redis-password", Value="x", Type="SecureString")
    producer_env.set(
        REDIS_URL=f"redis://127.0.0.1:{private_redis}/0", REDIS_SECRET_ARN="/gpuq/redis-password"
    )
    answer = lambda_handler(load_event("apigw_v2_single"), None)
    assert answer["statusCode"] == 202
    assert private_jobs(private_redis, producer_env.queues[0]) == api_body(answer)["task_ids"]


def test_a_missing_secret_names_the_variable_and_fails_every_record(
    producer_env: ProducerEnv, aws: None
) -> None:
    producer_env.set(REDIS_SECRET_ARN="arn:aws:secretsmanager:us-east-1:123456789012:secret:nope-AbCdEf")
    answer = lambda_handler(load_event("apigw_v1_single"), None)
    assert answer["statusCode"] == 500
    assert api_body(answer)["error"].startswith("REDIS_SECRET_ARN: cannot read the Redis password")
    sqs = lambda_handler(load_event("sqs_mixed"), None)
    assert len(sqs["batchItemFailures"]) == 3


@pytest.mark.slow  # 12 s on a loaded 2-core machine (make test-fast stays under a minute)
def test_a_wrong_password_is_an_unavailable_queue(
    producer_env: ProducerEnv, aws: None, private_redis: int
) -> None:
    ssm = boto3.client("ssm", region_name="us-east-1")
    ssm.put_parameter(Name="gpuq-redis-password", Value="wrong", Type="SecureString")
    producer_env.set(REDIS_URL=f"redis://127.0.0.1:{private_redis}/0", REDIS_SECRET_ARN="gpuq-redis-password")
    answer = lambda_handler(load_event("apigw_v1_single"), None)
    assert answer["statusCode"] == 503
    assert private_jobs(private_redis, producer_env.queues[0]) == []
