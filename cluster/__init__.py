"""AWS for fruits-pipeline: EMR cluster spec and steps, packaging, S3, the EU-region guard, IAM.

Modules: :mod:`cluster.guard` (GDPR: EU regions and bucket locations), :mod:`cluster.sizing`
(executor layout and prices per instance type, pure), :mod:`cluster.spec` (the
``run_job_flow`` request and steps, pure), :mod:`cluster.package` (the project's wheel,
its upload, the notebook for the cluster), :mod:`cluster.policy` (least-privilege S3
policy), :mod:`cluster.emr` (boto3 calls), :mod:`cluster.cli` (``fruits-pipeline bucket
...`` and ``fruits-pipeline emr ...``).

Only :mod:`cluster.emr`, :mod:`cluster.package` and :mod:`cluster.cli` call AWS; boto3 is
imported inside them, so ``fruits-pipeline --help`` never pays its start-up.
"""
