"""Token-shard data: manifests, the streaming loader and its S3 reader."""
