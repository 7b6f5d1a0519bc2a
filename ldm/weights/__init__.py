"""Published weights from local files: readers and key maps to the project's modules."""
