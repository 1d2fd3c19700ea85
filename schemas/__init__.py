"""pyarrow schemas of every table the jobs read or write, with validation (``python -m schemas.describe``)."""
