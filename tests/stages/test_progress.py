"""Our one progress display: its line, and the share of a step's own Spark tasks."""

from __future__ import annotations

import io
import logging

import pytest

from stages.base.progress import Progress, progress_line


def test_the_line_says_done_rate_and_eta():
    line = progress_line("featurize", "images", 1200, 4099, 26.6)
    assert line == "featurize: 1200/4099 images (29%), 45.1 images/s, ETA 1m04s"
    done = progress_line("featurize", "images", 4099, 4099, 3725.0)
    assert done == "featurize: 4099/4099 images (100%), 1.1 images/s, 1h02m"
    assert progress_line("reduce", "tasks", 3, None, 5.0) == "reduce: 3 tasks done, 5s"


@pytest.fixture
def info_logging():
    log = logging.getLogger("stages")
    before = log.level
    log.setLevel(logging.INFO)
    yield log
    log.setLevel(before)


def test_counts_the_tasks_of_its_own_step_only(spark, info_logging):
    sc = spark.sparkContext
    sc.parallelize(range(10), 5).count()  # another step's job: not counted
    out = io.StringIO()
    with Progress(spark, "featurize", 40, "images", stream=out) as progress:
        sc.parallelize(range(8), 4).map(lambda x: x * 2).collect()
        progress.settle()  # the job returned; its last task may not be counted yet
        assert progress.tasks() == (4, 4)
    assert out.getvalue().splitlines()[-1].startswith("featurize: 40/40 images (100%), ")
    # The job group is this step's only: a later job is not in it.
    sc.parallelize(range(4), 2).count()
    progress.settle()
    assert progress.tasks() == (4, 4)
    assert sc.getLocalProperty("spark.jobGroup.id") is None


def test_quiet_shows_nothing(spark, info_logging):
    info_logging.setLevel(logging.WARNING)  # what --quiet sets
    out = io.StringIO()
    with Progress(spark, "reduce", None, stream=out):
        spark.sparkContext.parallelize(range(4), 2).count()
    assert out.getvalue() == ""
