"""Files: local and Hadoop filesystems, atomic outputs, the FEATURES run layout, and S3
as the photos' store (the workers' byte fetcher, the executors' listing, notifications)."""
