"""Files: local and Hadoop filesystems, atomic outputs, the FEATURES run layout."""
