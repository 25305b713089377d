"""``--budget USD --alert-email ADDR``: an AWS Budgets COST budget on one run's spend.

Every cluster carries the cost-allocation tag :data:`RUN_TAG` with a value new for each
``emr up``/``emr run`` (:func:`new_run_id`); EMR puts the cluster's tags on its EC2
instances too.  The budget counts only costs carrying that tag
(``CostFilters.TagKeyValue = user:fruits-pipeline:run$<run>``) and mails at 80 % and
100 % of the limit in *actual* spend.

Why Budgets and not a CloudWatch alarm: the ``EstimatedCharges`` billing metric exists
only in us-east-1 and only per account and service, so it cannot isolate one cluster;
Budgets filters on a cost-allocation tag.  Two limits of it: billing data reaches
Budgets a few times a day (hours late: the alert is a record of the bill, the
``--max-cost`` deadline is the limit), and a user tag counts only once activated as a
cost-allocation tag (once per account: README).  Budgets is a global service (endpoint
in us-east-1): the budget holds its name, the amount, the tag and the addresses, no
pipeline data.
"""

from __future__ import annotations

import logging
import re
import secrets
from datetime import datetime, timezone
from typing import Any, Dict, List, Optional, Sequence

from stages.base.errors import UsageError

logger = logging.getLogger(__name__)

__all__ = [
    "BUDGETS_REGION",
    "BUDGET_TAG",
    "RUN_TAG",
    "THRESHOLDS",
    "budget_name",
    "budget_request",
    "check_alerts",
    "create_budget",
    "delete_budget",
    "new_run_id",
]

RUN_TAG = "fruits-pipeline:run"
BUDGET_TAG = "fruits-pipeline:budget"  # the budget's name, on the cluster
BUDGETS_REGION = "us-east-1"  # AWS Budgets' one endpoint (a global service)
THRESHOLDS = (80.0, 100.0)  # percent of the limit, actual spend
_EMAIL_RE = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")
_SNS_RE = re.compile(r"^arn:aws[a-z-]*:sns:[a-z0-9-]+:\d{12}:[A-Za-z0-9_-]{1,256}$")


def new_run_id(now: Optional[datetime] = None) -> str:
    """``20261205-171500-a1b2c3``: when the run started (UTC) and 6 random hex digits."""
    now = now or datetime.now(timezone.utc)
    return f"{now:%Y%m%d-%H%M%S}-{secrets.token_hex(3)}"


def budget_name(run_id: str) -> str:
    """``fruits-pipeline-<run id>``."""
    return f"fruits-pipeline-{run_id}"


def check_alerts(budget: Optional[float], emails: Sequence[str], sns: Optional[str]) -> None:
    """``--budget`` needs somewhere to send the alert; addresses must look like addresses.

    Raises
    ------
    UsageError
        A budget without ``--alert-email``/``--alert-sns`` (or the reverse), a limit
        that is not positive, a malformed address or topic ARN.
    """
    if budget is None:
        if emails or sns:
            raise UsageError("--alert-email/--alert-sns need --budget USD: the limit they alert on")
        return
    if not budget > 0:
        raise UsageError(f"--budget {budget:g} must be above 0 USD")
    if not emails and not sns:
        raise UsageError("--budget needs --alert-email ADDR or --alert-sns TOPIC_ARN to alert")
    for addr in emails:
        if not _EMAIL_RE.match(addr):
            raise UsageError(f"--alert-email {addr!r} is not an e-mail address")
    if sns and not _SNS_RE.match(sns):
        raise UsageError(f"--alert-sns {sns!r} is not an SNS topic ARN (arn:aws:sns:REGION:...)")


def budget_request(
    account_id: str,
    run_id: str,
    limit_usd: float,
    emails: Sequence[str] = (),
    sns: Optional[str] = None,
) -> Dict[str, Any]:
    """``create_budget``'s arguments: COST, filtered on the run's tag, 80 % and 100 % alerts.

    ANNUALLY with the default period (this calendar year): a run's cost is never split
    by a month's end.
    """
    subscribers: List[Dict[str, str]] = [
        {"SubscriptionType": "EMAIL", "Address": a} for a in emails
    ] + ([{"SubscriptionType": "SNS", "Address": sns}] if sns else [])
    return {
        "AccountId": account_id,
        "Budget": {
            "BudgetName": budget_name(run_id),
            "BudgetLimit": {"Amount": f"{limit_usd:.2f}", "Unit": "USD"},
            "CostFilters": {"TagKeyValue": [f"user:{RUN_TAG}${run_id}"]},
            "TimeUnit": "ANNUALLY",
            "BudgetType": "COST",
        },
        "NotificationsWithSubscribers": [
            {
                "Notification": {
                    "NotificationType": "ACTUAL",
                    "ComparisonOperator": "GREATER_THAN",
                    "Threshold": pct,
                    "ThresholdType": "PERCENTAGE",
                },
                "Subscribers": subscribers,
            }
            for pct in THRESHOLDS
        ],
    }


def create_budget(
    budgets_client,
    account_id: str,
    run_id: str,
    limit_usd: float,
    emails: Sequence[str] = (),
    sns: Optional[str] = None,
) -> str:
    """Create the run's budget; return its name."""
    request = budget_request(account_id, run_id, limit_usd, emails, sns)
    budgets_client.create_budget(**request)
    name = request["Budget"]["BudgetName"]
    to = ", ".join([*emails, *([sns] if sns else [])])
    logger.info(
        f"emr: budget {name}: {limit_usd:.2f} USD on tag {RUN_TAG}={run_id}, alerts at "
        f"80 % and 100 % of actual spend to {to}"
    )
    return name


def delete_budget(budgets_client, account_id: str, name: str) -> None:
    """Delete the budget ``name`` (the run it was for never started)."""
    budgets_client.delete_budget(AccountId=account_id, BudgetName=name)
    logger.info(f"emr: budget {name} deleted: the cluster was not created")
