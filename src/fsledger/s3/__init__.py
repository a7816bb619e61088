"""S3-compatible object stores: buckets (or prefixes) as repositories, and repositories mirrored
to buckets. Everything here needs the ``s3`` extra (boto3); nothing imports boto3 until a bucket
is actually used, so a local-only install never loads it.

- ``fsledger.s3.location``: ``s3://BUCKET[/PREFIX]`` URLs and clients from the standard AWS chain.
"""
