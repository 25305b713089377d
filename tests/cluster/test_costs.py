"""cluster.costs: the estimate before a start and the deadline a cost limit buys (pure)."""

from __future__ import annotations

import pytest

from cluster import costs, sizing
from cluster.spec import ClusterOptions

BUCKET = "fruits-eu"


def _opts(**kw) -> ClusterOptions:
    return ClusterOptions(bucket=BUCKET, **kw)


def test_default_cluster_is_model_bound_and_its_time_adds_up():
    # m5.large x 2 core: 2 workers a node, minus the driver's slot: 3 slots; 32 GETs in
    # flight at 15 ms (2133 img/s) outrun the model (145.6 img/s x 0.9 a core).
    est = costs.estimate(_opts(), 100_000, "test")
    assert est.slots == 3
    assert not est.s3_bound and est.slot_rate < 1000 * costs.S3_IN_FLIGHT / 15
    assert est.featurize_s == pytest.approx(45 + 100_000 / 10_000 + 100_000 / (3 * est.slot_rate))
    cores = 2 * 2 - 1  # the driver's container holds one
    assert est.reduce_s == pytest.approx(45 + 100 * 0.236 / cores)
    assert est.total_s == pytest.approx(480 + est.featurize_s + est.reduce_s)


def test_cost_items_follow_the_price_table():
    opts = _opts(instance_type="m5.xlarge", core=3)
    it = sizing.INSTANCE_TYPES["m5.xlarge"]
    est = costs.estimate(opts, 1_000_000, "test")
    hours = est.total_s / 3600
    assert est.usd["ec2"] == pytest.approx(4 * it.ec2_usd * hours, abs=1e-3)
    assert est.usd["emr"] == pytest.approx(4 * it.emr_usd * hours, abs=1e-3)
    ebs_h = 4 * (32 + 64) * costs.EBS_USD_PER_GIB_MONTH / 730
    assert est.usd["ebs"] == pytest.approx(ebs_h * hours, abs=1e-3)
    # a GET per image, a LIST page per 1000 twice (our count and featurize's), a PUT a task
    gets = 1_000_000 / 1000 * costs.S3_GET_USD_PER_1000
    others = (2000 + 489 + 20) / 1000 * costs.S3_PUT_LIST_USD_PER_1000
    assert est.usd["s3_requests"] == pytest.approx(gets + others, abs=1e-3)
    assert est.total_usd == pytest.approx(sum(est.usd.values()), abs=1e-3)


def test_spot_task_nodes_cut_ec2_not_the_emr_uplift():
    on_demand = costs.estimate(_opts(task=4), 10_000_000, "test")
    spot = costs.estimate(_opts(task=4, spot=True), 10_000_000, "test")
    assert spot.total_s == on_demand.total_s  # same nodes, same time
    assert spot.usd["emr"] == on_demand.usd["emr"]
    it = sizing.INSTANCE_TYPES["m5.large"]
    saved = 4 * it.ec2_usd * (1 - costs.SPOT_FRACTION) * on_demand.total_s / 3600
    assert on_demand.usd["ec2"] - spot.usd["ec2"] == pytest.approx(saved, abs=1e-3)


def test_more_nodes_finish_sooner_and_no_image_count_is_start_up_alone():
    small = costs.estimate(_opts(core=2), 1_000_000, "test")
    big = costs.estimate(_opts(core=8), 1_000_000, "test")
    assert big.featurize_s < small.featurize_s / 3
    empty = costs.estimate(_opts(), 0, "test")
    assert empty.total_s == costs.STARTUP_S and empty.usd["s3_requests"] == 0


def test_unmeasured_alpha_takes_the_slower_measured_rate():
    assert costs.per_core_rate("litert", 1.0)[0] == 145.6
    rate, source = costs.per_core_rate("litert", 0.5)
    assert rate == 145.6 and "alpha 0.5 not measured" in source
    rate, source = costs.per_core_rate("keras", 1.4)
    assert rate == pytest.approx(50.5 / 1.96) and "1.4^2" in source


def test_deadline_is_the_limit_over_the_most_the_cluster_can_cost_an_hour():
    opts = _opts(task=2, spot=True, max_instances=10)
    per_node = sizing.INSTANCE_TYPES["m5.large"]
    ebs = (32 + 32) * costs.EBS_USD_PER_GIB_MONTH / 730
    # managed scaling may grow to 10 core+task nodes, plus the primary; Spot at on-demand
    ceiling = 11 * (per_node.ec2_usd + per_node.emr_usd + ebs)
    assert costs.ceiling_per_hour(opts) == pytest.approx(ceiling)
    est = costs.estimate(opts, 100_000, "test")
    seconds = costs.deadline_seconds(5.0, opts, est)
    assert seconds == pytest.approx((5.0 - est.usd["s3_requests"]) / ceiling * 3600)


def test_estimate_lines_say_what_was_assumed():
    est = costs.estimate(_opts(task=1, spot=True), 10_000_000, "--images")
    text = "\n".join(est.lines(_opts(task=1, spot=True)))
    assert "10,000,000 images (--images)" in text
    assert "1 task on Spot" in text and "Spot EC2 at 0.4 x on-demand" in text
    assert "USD per million images" in text and "prices recalled" in text
    assert "32 in flight a slot" in text


def test_reads_one_at_a_time_make_the_cluster_s3_bound():
    # The reads of before the workers fetched their own photos: one request in flight.
    one = costs.Model(s3_in_flight=1)
    est = costs.estimate(_opts(), 100_000, "test", model=one)
    assert est.s3_bound and est.slot_rate == pytest.approx(1000 / 15)
    text = "\n".join(est.lines(_opts()))
    assert "S3-bound" in text
