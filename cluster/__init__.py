"""AWS for fruits-pipeline: EMR cluster spec and steps, packaging, S3, the EU-region guard, IAM.

Pure (no AWS calls): :mod:`cluster.guard`'s region checks (GDPR), :mod:`cluster.sizing`
(executor layout and prices per instance type), :mod:`cluster.costs` (the estimate before
a start, the ``--max-cost`` deadline), :mod:`cluster.classifications` and
:mod:`cluster.spec` (the ``run_job_flow`` request and steps), :mod:`cluster.policy`
(least-privilege S3 policy).  With a boto3 client: :mod:`cluster.emr` (bucket, cluster,
steps), :mod:`cluster.budget` (the run's AWS Budgets budget), :mod:`cluster.deadline`
(the EventBridge Scheduler termination), :mod:`cluster.network` (the SSH rule),
:mod:`cluster.launch` (what a start sets up, what ``emr down`` removes),
:mod:`cluster.package` (the project's wheel, its upload, the notebook),
:mod:`cluster.wheels` (PyPI's wheels for Graviton nodes, through pip).
:mod:`cluster.cli` and :mod:`cluster.options`: ``fruits-pipeline bucket ...`` and
``fruits-pipeline emr ...``.

boto3 is imported inside the functions that call AWS, so ``fruits-pipeline --help`` never
pays its start-up.
"""
