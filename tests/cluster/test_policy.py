"""cluster.policy: the instance profile reaches only the bucket's own prefixes."""

from __future__ import annotations

import json

import pytest

from cluster.policy import instance_profile_policy, tls_only_bucket_policy
from stages.base.errors import UsageError
from stages.cli import main

ARN = "arn:aws:s3:::fruits-eu"
ALL_PREFIXES = ("Test/", "Features/", "Results/", "code/", "logs/", "jupyter/")
WRITE_PREFIXES = ("Features/", "Results/", "logs/", "jupyter/")


def _actions(statement):
    a = statement["Action"]
    return [a] if isinstance(a, str) else a


def _check_limited(doc, write_prefixes=WRITE_PREFIXES, all_prefixes=ALL_PREFIXES):
    assert doc["Version"] == "2012-10-17"
    for st in doc["Statement"]:
        assert st["Effect"] == "Allow"
        if all(a.startswith("sqs:") for a in _actions(st)):  # the bucket's event queue only
            assert st["Resource"] == [f"arn:aws:sqs:*:*:{ARN.rsplit(':', 1)[-1]}-new-photos"]
            continue
        for res in st["Resource"]:
            assert res == ARN or res.startswith(ARN + "/"), res
            if res == ARN:
                continue
            key = res[len(ARN) + 1 :]
            assert "*" not in key[:-1], res  # a wildcard only at the end
            assert key.startswith(all_prefixes) or key.endswith("_$folder$"), res
        writes = {"s3:PutObject", "s3:DeleteObject"} & set(_actions(st))
        if writes:
            for res in st["Resource"]:
                key = res[len(ARN) + 1 :]
                folder = key.replace("_$folder$", "/")
                assert folder.startswith(write_prefixes), res
        if "s3:ListBucket" in _actions(st):
            assert st["Resource"] == [ARN]
            prefixes = st["Condition"]["StringLike"]["s3:prefix"]
            assert prefixes
            for p in prefixes:
                assert (p.rstrip("*").rstrip("/") + "/").startswith(all_prefixes), p


def test_policy_is_limited_to_the_bucket_prefixes():
    doc = instance_profile_policy("fruits-eu")
    _check_limited(doc)
    actions = {a for st in doc["Statement"] for a in _actions(st)}
    assert {"s3:ListBucket", "s3:GetObject", "s3:PutObject", "s3:DeleteObject"} <= actions
    assert not any(a.endswith("*") for a in actions)
    get = [st for st in doc["Statement"] if "s3:GetObject" in _actions(st)][0]
    assert sorted(get["Resource"]) == sorted(f"{ARN}/{p}*" for p in ALL_PREFIXES)


def test_inputs_and_code_are_read_only():
    doc = instance_profile_policy("fruits-eu")
    for st in doc["Statement"]:
        if "s3:PutObject" in _actions(st):
            assert f"{ARN}/Test/*" not in st["Resource"]
            assert f"{ARN}/code/*" not in st["Resource"]
            assert f"{ARN}/Results/*" in st["Resource"]


def test_emr_policy_command_prints_valid_json(capsys):
    assert main(["emr", "policy", "--bucket", "fruits-eu"]) == 0
    doc = json.loads(capsys.readouterr().out)
    _check_limited(doc)


def test_emr_policy_custom_prefixes(capsys):
    argv = ["emr", "policy", "--bucket", "fruits-eu", "--read", "Images", "--write", "Out/"]
    assert main(argv) == 0
    doc = json.loads(capsys.readouterr().out)
    _check_limited(doc, write_prefixes=("Out/",), all_prefixes=("Images/", "Out/"))


def test_emr_policy_refuses_a_wildcard_prefix(capsys):
    assert main(["emr", "policy", "--bucket", "fruits-eu", "--write", "*"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "prefix '*' is not valid" in err


def test_policy_refuses_bad_bucket():
    with pytest.raises(UsageError, match="bucket name 'Fruits' is not valid"):
        instance_profile_policy("Fruits")


def test_tls_only_bucket_policy_denies_plain_http():
    doc = tls_only_bucket_policy("fruits-eu")
    (st,) = doc["Statement"]
    assert st["Effect"] == "Deny"
    assert st["Principal"] == "*"
    assert st["Condition"] == {"Bool": {"aws:SecureTransport": "false"}}
    assert sorted(st["Resource"]) == [ARN, ARN + "/*"]


def test_the_nodes_may_consume_the_new_photo_queue_of_their_bucket_only():
    from cluster.policy import instance_profile_policy, new_photos_queue

    statements = {s["Sid"]: s for s in instance_profile_policy("fruits-b")["Statement"]}
    sqs = statements["ConsumeNewPhotoEvents"]
    assert sqs["Resource"] == ["arn:aws:sqs:*:*:fruits-b-new-photos"]
    assert set(sqs["Action"]) >= {"sqs:ReceiveMessage", "sqs:DeleteMessage"}
    assert not any(a in ("sqs:*", "sqs:SendMessage") for a in sqs["Action"])
    assert new_photos_queue("fruits-b") == "fruits-b-new-photos"
