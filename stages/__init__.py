"""The two Spark jobs of fruits-pipeline (featurize, reduce), their pieces and the CLI."""

__version__ = "0.1.0"
