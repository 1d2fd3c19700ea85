"""Ray building blocks: the shard datasource, CPU decode tasks, the attribution actor, the committing sink."""
