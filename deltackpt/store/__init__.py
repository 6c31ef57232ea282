"""The repository's files and where they live: storage backends, pack and index files, step manifests."""
