"""The floor everything stands on: errors, logging, parameters, the features contract,
the Spark session and its helpers."""
