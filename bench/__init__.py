"""vhost-py benchmarks: ``python -m bench`` (see bench/__main__.py) and the pytest benches."""
