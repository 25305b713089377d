"""The spark-submit entry points of the stages (one thin file each)."""
