"""Reading inputs: listing ``input.uri``, manifests, shard files, bytes and pixels, and the
credentials and locations every URI goes through."""
